//! Why a script was refused at compile (deploy) time.
//!
//! **Owns**: [`LuaError`] and the parsing of a line number out of Luau's messages.
//! Errors at run time are not here: they are [`BehaviourError`](crate::behaviour::BehaviourError)s
//! like any behaviour's, and a broken limit is a `Failed` that names the limit.

/// Why [`LuaBehaviour::compile`](super::LuaBehaviour::compile) refused a script. Each message
/// says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LuaError {
    /// The source does not parse.
    #[error("{}", syntax_message(*.line, message))]
    Syntax {
        /// The line Luau points at, when its message names one.
        line: Option<u32>,
        /// Luau's message, without the chunk-name prefix.
        message: String,
    },
    /// The source is larger than the engine accepts.
    #[error("script is {bytes} bytes; the limit is {limit} bytes")]
    TooLarge { bytes: usize, limit: usize },
    /// Running the script's top level (which defines the functions) failed.
    #[error("the script failed while loading: {0}")]
    Load(String),
    /// A required function is not defined.
    #[error(
        "the script does not define `{0}`; a behaviour needs `init(key, arg)` and \
         `handle_call(msg, state, ctx)`"
    )]
    MissingFunction(&'static str),
    /// A handler name is bound to something that is not a function.
    #[error("`{name}` must be a function, but the script sets it to a {found}")]
    NotAFunction { name: &'static str, found: String },
    /// The dry `init` call failed or returned something that is not a valid state.
    #[error("init failed on a dry run: {0}")]
    BadInit(String),
    /// Loading or the dry `init` broke a limit (CPU, time or memory).
    #[error("{0}")]
    Limit(String),
    /// The VM could not be set up (an engine fault, or a memory limit too small for a VM).
    #[error("could not create a Lua VM: {0}")]
    Vm(String),
}

fn syntax_message(line: Option<u32>, message: &str) -> String {
    match line {
        Some(line) => format!("syntax error at line {line}: {message}"),
        None => format!("syntax error: {message}"),
    }
}

/// Splits Luau's `chunk:LINE: message` (run time) or `LINE: message` (the compiler) into the
/// line and the message; anything else is returned whole.
pub(super) fn split_line(text: &str) -> (Option<u32>, String) {
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits > 0 && text.as_bytes().get(digits) == Some(&b':') {
        if let Ok(line) = text[..digits].parse() {
            return (Some(line), text[digits + 1..].trim().to_owned());
        }
    }
    // Find the first `:<digits>:` and take what follows as the message.
    let bytes = text.as_bytes();
    let mut start = 0;
    while let Some(offset) = text[start..].find(':') {
        let colon = start + offset;
        let digits = bytes[colon + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        let end = colon + 1 + digits;
        if digits > 0 && bytes.get(end) == Some(&b':') {
            if let Ok(line) = text[colon + 1..end].parse() {
                return (Some(line), text[end + 1..].trim().to_owned());
            }
        }
        start = colon + 1;
    }
    (None, text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_line_finds_the_first_position() {
        assert_eq!(
            split_line("cart:12: Expected 'end'"),
            (Some(12), "Expected 'end'".into())
        );
        assert_eq!(
            split_line(":3: Incomplete statement: expected assignment"),
            (Some(3), "Incomplete statement: expected assignment".into())
        );
        assert_eq!(
            split_line("6: Expected 'end' (to close 'function' at line 2)"),
            (
                Some(6),
                "Expected 'end' (to close 'function' at line 2)".into()
            )
        );
        assert_eq!(split_line("no position"), (None, "no position".into()));
        assert_eq!(split_line("a:b: c"), (None, "a:b: c".into()));
    }

    #[test]
    fn messages_read_well() {
        let error = LuaError::Syntax {
            line: Some(4),
            message: "Expected 'end'".into(),
        };
        assert_eq!(error.to_string(), "syntax error at line 4: Expected 'end'");
        assert!(LuaError::MissingFunction("handle_call")
            .to_string()
            .contains("does not define `handle_call`"));
    }
}
