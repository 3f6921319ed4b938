//! The standard library: `.kiln` modules embedded into the binary, addressed as `std.a.b`.

/// `(module path, source)` for every stdlib module. `std.prelude` is imported implicitly.
pub const MODULES: &[(&str, &str)] = &[
    ("std.prelude", include_str!("../../stdlib/prelude.kiln")),
    ("std.clusters", include_str!("../../stdlib/clusters.kiln")),
    (
        "std.models.gpt2",
        include_str!("../../stdlib/models/gpt2.kiln"),
    ),
    (
        "std.models.bert",
        include_str!("../../stdlib/models/bert.kiln"),
    ),
    (
        "std.models.llama",
        include_str!("../../stdlib/models/llama.kiln"),
    ),
    (
        "std.models.gpt3",
        include_str!("../../stdlib/models/gpt3.kiln"),
    ),
    (
        "std.models.megatron",
        include_str!("../../stdlib/models/megatron.kiln"),
    ),
    (
        "std.models.tiny",
        include_str!("../../stdlib/models/tiny.kiln"),
    ),
    (
        "std.objectives.pet",
        include_str!("../../stdlib/objectives/pet.kiln"),
    ),
];

pub const PRELUDE: &str = "std.prelude";

pub fn source(module: &str) -> Option<&'static str> {
    MODULES
        .iter()
        .find(|(name, _)| *name == module)
        .map(|(_, src)| *src)
}

/// The name shown in diagnostics and spec origins: `<std>/models/gpt2.kiln`.
pub fn display_name(module: &str) -> String {
    let rest = module.strip_prefix("std.").unwrap_or(module);
    format!("<std>/{}.kiln", rest.replace('.', "/"))
}

pub fn module_names() -> impl Iterator<Item = &'static str> {
    MODULES.iter().map(|(name, _)| *name)
}
