#!/usr/bin/env python3
"""Makes examples/data/austen_train.jsonl and austen_eval.jsonl, the quick-start's data.

Source: Jane Austen, "Pride and Prejudice" (1813), public domain, as transcribed by Project
Gutenberg and shipped in the Debian package r-cran-janeaustenr 1.0.0-1 (Julia Silge's
janeaustenr 1.0.0; the package is MIT-licensed, the novel's text is in the public domain), file
/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb, object `prideprejudice`: the novel as a
character vector of its lines.

Reproduce (R itself is not needed; only the package's files):

    apt-get download r-cran-janeaustenr
    dpkg -x r-cran-janeaustenr_1.0.0-1_all.deb /tmp/janeaustenr
    python3 examples/data/make_stories.py /tmp/janeaustenr/usr/lib/R/site-library/janeaustenr/data

(or, with the package installed, no argument.) The output is deterministic.

Records: the novel's paragraphs, one JSON object {"text": ...} per line, wrapped lines joined,
Gutenberg's _italics_ marks removed, chapter headings dropped. Short paragraphs (dialogue) are
joined with the next until a record has at least MIN_CHARS characters; long ones are cut at
sentence ends, and long sentences after their semicolons, colons or commas, so that a record has
at most MAX_CHARS (about 65 tokens of the 1,024-token BPE: 99% of the text fits the quick-start's
64-token sequences). Held out for evaluation: whole chapters (EVAL_CHAPTERS), so that the
evaluation text is paragraphs the model never trains on.

The quick-start's tokenizer is then trained on the training text alone:

    kiln tokenizer train examples/data/austen_train.jsonl --vocab 1024 --out examples/data/austen_tokenizer.json
"""

import gzip
import json
import re
import struct
import sys
import zlib
from pathlib import Path

NOVEL = "prideprejudice"
MIN_CHARS = 120
MAX_CHARS = 200
EVAL_CHAPTERS = (38,)  # held out: 43 records, about 2,000 tokens
DEFAULT_DIR = "/usr/lib/R/site-library/janeaustenr/data"


class Reader:
    """R's XDR serialization format, as much of it as the lazy-load index and a character
    vector need."""

    def __init__(self, blob):
        assert blob[:2] == b"X\n", "not an XDR-serialized R object"
        self.blob, self.pos = blob, 2
        self.refs = []  # symbols, which later occurrences refer to by number
        version = self.int()
        self.int()  # R version that wrote it
        self.int()  # oldest R version that reads it
        if version == 3:
            n = self.int()  # the native encoding's name
            self.pos += n

    def int(self):
        (v,) = struct.unpack(">i", self.blob[self.pos : self.pos + 4])
        self.pos += 4
        return v

    def bytes(self, n):
        out = self.blob[self.pos : self.pos + n]
        self.pos += n
        return out

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NULL
            return None
        if kind == 255:  # a reference to an earlier symbol
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind == 9:  # CHARSXP
            n = self.int()
            return None if n == -1 else self.bytes(n).decode("utf-8")
        if kind == 2:  # pairlist (attributes): tag, value, rest
            out = {}
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                out[tag] = self.item()
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
                if kind != 2:
                    break
            assert kind == 254
            return out
        if kind == 1:  # symbol
            self.refs.append(self.item())
            return self.refs[-1]
        if kind in (10, 13, 14):  # logical / integer / double vector
            n = self.int()
            fmt = ">%dd" % n if kind == 14 else ">%di" % n
            size = 8 if kind == 14 else 4
            values = list(struct.unpack(fmt, self.bytes(size * n)))
        elif kind in (16, 19):  # character vector / list
            n = self.int()
            values = [self.item() for _ in range(n)]
        else:
            raise ValueError("unsupported R type %d" % kind)
        if has_attr:
            attrs = self.item()
            if "names" in attrs:
                return dict(zip(attrs["names"], values))
        return values


def novel_lines(data_dir):
    data_dir = Path(data_dir)
    index = Reader(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())).item()
    offset, length = index["variables"][NOVEL]
    raw = (data_dir / "Rdata.rdb").read_bytes()[offset : offset + length]
    (size,) = struct.unpack(">I", raw[:4])
    blob = zlib.decompress(raw[4:])
    assert len(blob) == size
    return Reader(blob).item()


def chapters(lines):
    """The novel's chapters, each a list of paragraphs (wrapped lines joined)."""
    out, para = [], []
    for line in lines + [""]:
        line = line.strip()
        if re.fullmatch(r"Chapter \d+", line):
            out.append([])
            continue
        if line:
            para.append(line)
            continue
        if para and out:  # the title before chapter 1 is dropped
            text = " ".join(para).replace("_", "")
            out[-1].append(re.sub(r"\s+", " ", text))
        para = []
    return out


def pieces(paragraph):
    """A paragraph's sentences; a sentence longer than MAX_CHARS is cut further after its
    semicolons, colons and then commas (Austen's sentences run to 700 characters)."""
    out = []
    for sentence in re.split(r'(?:(?<=[.!?])|(?<=[.!?]")) (?=["A-Z])', paragraph):
        parts = [sentence]
        for mark in (r"(?<=[;:]) ", r"(?<=,) "):
            parts = [q for p in parts for q in (re.split(mark, p) if len(p) > MAX_CHARS else [p])]
        out.extend(parts)
    return out


def records(paragraphs):
    """Paragraphs joined up to MIN_CHARS and cut at sentence ends down to MAX_CHARS."""
    out, current = [], ""
    for p in paragraphs:
        for s in pieces(p) if len(p) > MAX_CHARS else [p]:
            if current and len(current) + 1 + len(s) > MAX_CHARS:
                out.append(current)
                current = ""
            current = f"{current} {s}" if current else s
            if len(current) >= MIN_CHARS:
                out.append(current)
                current = ""
    if current:
        out.append(current)
    return out


def main():
    data_dir = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_DIR
    book = chapters(novel_lines(data_dir))
    assert len(book) == 61, len(book)
    here = Path(__file__).resolve().parent
    train, evaluation = [], []
    for number, chapter in enumerate(book, start=1):
        held_out = number in EVAL_CHAPTERS
        (evaluation if held_out else train).extend(records(chapter))
    for name, rows in (("austen_train.jsonl", train), ("austen_eval.jsonl", evaluation)):
        with open(here / name, "w", encoding="utf-8", newline="\n") as f:
            for text in rows:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} records, {sum(map(len, rows))} characters")


if __name__ == "__main__":
    main()
