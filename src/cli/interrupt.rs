//! Ctrl-C and SIGTERM during `kiln run`: the first asks the run to stop after its step with a
//! checkpoint; a second ends the process at once (the last complete checkpoint stays intact).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

/// Exit status of a process ended by a second interrupt (128 + SIGINT, as shells report it).
const FORCED_EXIT: i32 = 130;

/// The flag the first SIGINT or SIGTERM sets; handlers are installed once per process.
pub fn install() -> std::io::Result<Arc<AtomicBool>> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    if let Some(flag) = FLAG.get() {
        return Ok(flag.clone());
    }
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Registered first, so that it sees the flag as the previous signal left it.
        signal_hook::flag::register_conditional_shutdown(signal, FORCED_EXIT, flag.clone())?;
        signal_hook::flag::register(signal, flag.clone())?;
    }
    Ok(FLAG.get_or_init(|| flag).clone())
}
