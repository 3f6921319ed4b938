//! `kiln check --emit spec`: the resolved spec with the origin of every value, as TOML (with
//! the origin as a comment after each value) or JSON (with an `origins` table beside it).

use super::{CheckedModule, Origins};
use crate::diagnostics::SourceMap;
use serde_json::{Map, Value as Json};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Toml,
    Json,
}

pub fn emit(module: &CheckedModule, sources: &SourceMap, format: Format) -> String {
    let mut entries: Vec<(String, &'static str, Json, &Origins)> = Vec::new();
    for e in &module.experiments {
        entries.push((
            e.value.name.clone(),
            "experiment",
            to_json(&e.value),
            &e.origins,
        ));
    }
    for p in &module.pipelines {
        entries.push((
            p.value.name.clone(),
            "pipeline",
            to_json(&p.value),
            &p.origins,
        ));
    }
    match format {
        Format::Json => {
            let mut root = Map::new();
            for (name, kind, spec, origins) in entries {
                let mut from = Map::new();
                leaves(&spec, "", &mut |path, _| {
                    from.insert(
                        path.to_string(),
                        Json::String(origins.describe(path, sources)),
                    );
                });
                let mut item = Map::new();
                item.insert("kind".into(), Json::String(kind.into()));
                item.insert("spec".into(), spec);
                item.insert("origins".into(), Json::Object(from));
                root.insert(name, Json::Object(item));
            }
            let mut text = serde_json::to_string_pretty(&Json::Object(root)).unwrap_or_default();
            text.push('\n');
            text
        }
        Format::Toml => {
            let mut doc = toml_edit::DocumentMut::new();
            for (name, kind, spec, origins) in entries {
                let mut table = toml_edit::Table::new();
                table.insert("kind", toml_edit::value(kind));
                fill_table(&mut table, &spec, "", origins, sources);
                doc.insert(&name, toml_edit::Item::Table(table));
            }
            doc.to_string()
        }
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Json {
    // Spec types are plain data: serialising them cannot fail.
    serde_json::to_value(value).unwrap_or(Json::Null)
}

/// Calls `f` for every leaf (scalars, lists of scalars) with its dotted path.
fn leaves(v: &Json, path: &str, f: &mut dyn FnMut(&str, &Json)) {
    match v {
        Json::Object(map) => {
            for (k, child) in map {
                leaves(child, &join(path, k), f);
            }
        }
        Json::Array(items) if items.iter().any(|i| i.is_object() || i.is_array()) => {
            for (i, child) in items.iter().enumerate() {
                leaves(child, &join(path, &i.to_string()), f);
            }
        }
        Json::Null => {}
        _ => f(path, v),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn fill_table(
    table: &mut toml_edit::Table,
    v: &Json,
    path: &str,
    origins: &Origins,
    sources: &SourceMap,
) {
    let Json::Object(map) = v else { return };
    for (k, child) in map {
        let child_path = join(path, k);
        match child {
            Json::Null => {}
            Json::Object(_) => {
                let mut sub = toml_edit::Table::new();
                fill_table(&mut sub, child, &child_path, origins, sources);
                table.insert(k, toml_edit::Item::Table(sub));
            }
            Json::Array(items) if items.iter().any(Json::is_object) => {
                let mut array = toml_edit::ArrayOfTables::new();
                for (i, item) in items.iter().enumerate() {
                    let mut sub = toml_edit::Table::new();
                    fill_table(
                        &mut sub,
                        item,
                        &join(&child_path, &i.to_string()),
                        origins,
                        sources,
                    );
                    array.push(sub);
                }
                table.insert(k, toml_edit::Item::ArrayOfTables(array));
            }
            _ => {
                let Some(mut value) = scalar(child) else {
                    continue;
                };
                value
                    .decor_mut()
                    .set_suffix(format!("  # {}", origins.describe(&child_path, sources)));
                table.insert(k, toml_edit::Item::Value(value));
            }
        }
    }
}

fn scalar(v: &Json) -> Option<toml_edit::Value> {
    Some(match v {
        Json::Bool(b) => (*b).into(),
        Json::Number(n) => match n.as_i64() {
            Some(i) => i.into(),
            None => n.as_f64()?.into(),
        },
        Json::String(s) => s.as_str().into(),
        Json::Array(items) => {
            let mut array = toml_edit::Array::new();
            for item in items {
                array.push(scalar(item)?);
            }
            array.into()
        }
        _ => return None,
    })
}
