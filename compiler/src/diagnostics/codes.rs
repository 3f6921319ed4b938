//! Stable diagnostic codes. A code never changes meaning once released; new checks get new
//! codes. `kiln explain CODE` prints the description. The table is in code order (the last
//! entry is the highest code, which `kiln explain` names as the end of the range).

macro_rules! codes {
    ($($variant:ident = $code:literal : $text:literal,)*) => {
        /// A stable error code, printed as `error[K0001]`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Code { $($variant,)* }

        impl Code {
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self { $(Code::$variant => $code,)* }
            }

            /// One-paragraph explanation for `kiln explain`.
            pub fn explanation(self) -> &'static str {
                match self { $(Code::$variant => $text,)* }
            }
        }
    };
}

codes! {
    Syntax = "K0001": "The file does not follow Kiln's grammar. The caret marks the first token the parser could not accept, and the message lists what it expected there.",
    Import = "K0002": "An import names a standard-library module or a file that does not exist, or a file that could not be read.",
    ImportCycle = "K0003": "Files import each other in a cycle. Imports must form a tree: move the shared definitions into a third file.",
    UnknownName = "K0004": "A name is not a definition in this file, an imported definition, or a field of an enclosing record.",
    UnknownField = "K0005": "A record has a field that its kind does not define. Misspelt fields are errors rather than silently ignored settings.",
    Type = "K0006": "A value has the wrong type for where it is used (a string where a number is expected, a model where a cluster is expected, ...).",
    Range = "K0007": "A number is outside the range its field allows (rank 0, dropout 1.5, a negative learning rate, a size above Kiln's limit for it, a sequence longer than the model's positions, ...).",
    Unit = "K0008": "A quantity has an unknown unit, or a unit of the wrong dimension (bytes where a bandwidth is expected).",
    Missing = "K0009": "A required field has no value and no default.",
    Cycle = "K0010": "A value refers to itself, directly or through other fields or definitions.",
    Duplicate = "K0011": "A definition, field, import or label appears twice.",
    Divisibility = "K0012": "A shape does not divide: heads must divide hidden, kv_heads must divide heads, tensor parallelism must divide heads and the FFN width, and so on.",
    Pattern = "K0013": "A PET pattern must contain exactly one [MASK], and each {placeholder} must be a data field.",
    Verbalizer = "K0014": "A PET verbalizer must map each label to a distinct word.",
    Mesh = "K0015": "The parallel plan does not match the mesh: data x tensor x pipeline must equal the number of devices.",
    Io = "K0016": "A file that the experiment names (data, tokenizer, Hugging Face or PEFT directory) does not exist or cannot be read.",
    External = "K0017": "A Hugging Face config.json or PEFT adapter_config.json could not be understood.",
    Conflict = "K0018": "Two settings contradict each other (steps and epochs, a manual degree with plan = auto, two prompt-style adapters, ...).",
    Arithmetic = "K0019": "Arithmetic failed: division by zero, integer overflow, or an operator applied to values it does not accept.",
    Variant = "K0020": "A value is not one of the choices its field accepts (an unknown activation, optimizer, schedule, ...).",
    Target = "K0021": "An adapter targets a module name that the model family does not have.",
    Head = "K0022": "The objective needs an output head that the model does not declare.",
    Override = "K0023": "A `--set key=value` override names no field or does not parse.",
    Internal = "K0024": "The compiler broke one of its own invariants (a bug in Kiln, not in the experiment). Please report it with the experiment file.",
    Memory = "K0025": "The plan does not fit in device memory. The message names the stage, the predicted bytes and the capacity, and lists settings that would make it fit.",
    Placement = "K0026": "A parallel degree does not fit the hardware's topology, such as tensor parallelism spanning nodes.",
    NoPlan = "K0027": "The planner found no strategy at all for this experiment on this mesh (for example, a batch that no data-parallel degree divides).",
}

#[cfg(test)]
mod tests {
    use super::Code;

    #[test]
    fn the_table_runs_from_k0001_without_gaps_or_repeats() {
        for (i, code) in Code::ALL.iter().enumerate() {
            assert_eq!(
                code.as_str(),
                format!("K{:04}", i + 1),
                "{code:?} is out of order"
            );
        }
    }

    #[test]
    fn every_code_is_explained() {
        for code in Code::ALL {
            assert!(
                code.explanation().ends_with('.') && code.explanation().len() > 40,
                "{code:?} needs a one-paragraph explanation"
            );
        }
    }
}
