//! Builtins a request can make panic or run without bound, guarded.
//!
//! A panic traps the wasm VM for that worker, and a builtin runs inside one
//! RVM instruction, so the VM's instruction budget cannot stop it. Measured
//! against regorus 0.14.1 with request-sized arguments:
//!
//! | builtin | what an argument did | guard |
//! |---|---|---|
//! | `numbers.range(1, 1e18)` | panicked (capacity overflow) | at most [`MAX_ELEMENTS`] elements |
//! | `numbers.range_step(1, 1e18, 1)`, `(1, 10, 0)` | panicked (capacity overflow, divide by zero) | a positive step, at most [`MAX_ELEMENTS`] |
//! | `strings.count(s, "")` | panicked (window size zero) | answered as OPA does: characters + 1 |
//! | `net.cidr_expand("10.0.0.0/8")`, `("::/0")` | 1.9 s for 16 M entries; without end | at most [`MAX_ELEMENTS`] addresses |
//! | `sprintf("%0999999999d", [1])` | 3.5 s and 1 GB | widths and precisions at most [`MAX_WIDTH`] |
//!
//! A refused call is a resource-limit error, which regorus propagates even in
//! non-strict mode (so `not numbers.range(…)` cannot flip to true): the
//! evaluation fails, the request is denied and `trustweave.rego_errors` counts it.
//! The compiled program's resolved builtins are replaced by these wrappers,
//! which check the arguments and then call regorus' own implementation.

use std::sync::OnceLock;

use regorus::rvm::program::Program;
use regorus::unstable::{BuiltinFcn, Expr, Ref, Span, BUILTINS};
use regorus::{LimitError, Value};

/// Most elements a guarded builtin may produce.
pub const MAX_ELEMENTS: u64 = 100_000;
/// Largest `sprintf` width or precision.
pub const MAX_WIDTH: u64 = 4_096;

type Args<'a> = &'a [Value];
type Params<'a> = &'a [Ref<Expr>];
type Outcome = anyhow::Result<Value>;

/// The guarded builtins, by name, with the arity regorus registers.
const GUARDED: [(&str, BuiltinFcn); 5] = [
    ("numbers.range", (range, 2)),
    ("numbers.range_step", (range_step, 3)),
    ("strings.count", (strings_count, 2)),
    ("net.cidr_expand", (cidr_expand, 1)),
    ("sprintf", (sprintf, 2)),
];

/// Replaces every guarded builtin the program calls with its guard.
pub fn guard(program: &mut Program) {
    for (info, resolved) in program
        .builtin_info_table
        .iter()
        .zip(program.resolved_builtins.iter_mut())
    {
        if let Some((_, guarded)) = GUARDED.iter().find(|(name, _)| *name == info.name) {
            *resolved = *guarded;
        }
    }
}

/// Regorus' own implementation of `name` (present: the program resolved it).
fn original(name: &'static str) -> Option<BuiltinFcn> {
    static ORIGINALS: OnceLock<Vec<(&'static str, BuiltinFcn)>> = OnceLock::new();
    ORIGINALS
        .get_or_init(|| {
            GUARDED
                .iter()
                .filter_map(|(n, _)| BUILTINS.get(n).map(|f| (*n, *f)))
                .collect()
        })
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
}

fn call(
    name: &'static str,
    span: &Span,
    params: Params<'_>,
    args: Args<'_>,
    strict: bool,
) -> Outcome {
    match original(name) {
        Some((f, _)) => f(span, params, args, strict),
        None => Err(anyhow::anyhow!("{name} is not available")),
    }
}

/// The error a refused call gives: a resource limit, never a silent undefined.
fn refused(elements: u64) -> anyhow::Error {
    anyhow::Error::new(LimitError::MemoryLimitExceeded {
        usage: elements.saturating_mul(16),
        limit: MAX_ELEMENTS.saturating_mul(16),
    })
}

/// An integer argument as i128 (`None`: not a number, or not an integer in range).
fn integer(value: &Value) -> Option<i128> {
    let number = value.as_number().ok()?;
    if !number.is_integer() {
        return None;
    }
    if let Some(i) = number.as_i64() {
        return Some(i128::from(i));
    }
    // Integers beyond i64 (regorus keeps them exactly) are far past any limit.
    number
        .as_f64()
        .map(|f| if f < 0.0 { i128::MIN } else { i128::MAX })
}

fn range(span: &Span, params: Params<'_>, args: Args<'_>, strict: bool) -> Outcome {
    if let (Some(Some(a)), Some(Some(b))) = (args.first().map(integer), args.get(1).map(integer)) {
        let elements = b.abs_diff(a).saturating_add(1);
        if elements > u128::from(MAX_ELEMENTS) {
            return Err(refused(u64::try_from(elements).unwrap_or(u64::MAX)));
        }
    }
    call("numbers.range", span, params, args, strict)
}

fn range_step(span: &Span, params: Params<'_>, args: Args<'_>, strict: bool) -> Outcome {
    let ints: Vec<Option<i128>> = args.iter().map(integer).collect();
    if let [Some(a), Some(b), step] = ints.as_slice() {
        match step {
            Some(step) if *step > 0 => {
                let elements = b
                    .abs_diff(*a)
                    .checked_div(step.unsigned_abs())
                    .unwrap_or(u128::MAX)
                    .saturating_add(1);
                if elements > u128::from(MAX_ELEMENTS) {
                    return Err(refused(u64::try_from(elements).unwrap_or(u64::MAX)));
                }
            }
            // OPA: "step must be a positive number above zero" (regorus divides by it).
            _ => {
                return Err(anyhow::anyhow!(
                    "numbers.range_step: step must be a positive integer"
                ))
            }
        }
    }
    call("numbers.range_step", span, params, args, strict)
}

fn strings_count(span: &Span, params: Params<'_>, args: Args<'_>, strict: bool) -> Outcome {
    if let (Some(Ok(text)), Some(Ok(search))) = (
        args.first().map(Value::as_string),
        args.get(1).map(Value::as_string),
    ) {
        if search.is_empty() {
            // Go's strings.Count(s, ""): the number of characters plus one.
            let count = u64::try_from(text.chars().count()).unwrap_or(u64::MAX);
            return Ok(Value::from(count.saturating_add(1)));
        }
    }
    call("strings.count", span, params, args, strict)
}

fn cidr_expand(span: &Span, params: Params<'_>, args: Args<'_>, strict: bool) -> Outcome {
    if let Some(Ok(cidr)) = args.first().map(Value::as_string) {
        if let Some((address, prefix)) = cidr.split_once('/') {
            let bits: u32 = if address.contains(':') { 128 } else { 32 };
            if let Ok(prefix) = prefix.trim().parse::<u32>() {
                let host_bits = bits.saturating_sub(prefix);
                // 2^17 > MAX_ELEMENTS: anything wider is refused.
                if host_bits >= 17 {
                    return Err(refused(u64::MAX));
                }
            }
        }
    }
    call("net.cidr_expand", span, params, args, strict)
}

fn sprintf(span: &Span, params: Params<'_>, args: Args<'_>, strict: bool) -> Outcome {
    if let Some(Ok(format)) = args.first().map(Value::as_string) {
        let widest = widest_field(format);
        if widest > MAX_WIDTH {
            return Err(refused(widest));
        }
    }
    call("sprintf", span, params, args, strict)
}

/// The largest width or precision any `%` verb of `format` asks for.
fn widest_field(format: &str) -> u64 {
    let mut widest = 0u64;
    let mut in_verb = false;
    let mut number = 0u64;
    for c in format.chars() {
        match (in_verb, c) {
            (false, '%') => {
                in_verb = true;
                number = 0;
            }
            (true, '0'..='9') => {
                let digit = u64::from(c.to_digit(10).unwrap_or(0));
                number = number.saturating_mul(10).saturating_add(digit);
                widest = widest.max(number);
            }
            (true, '.' | '+' | '-' | ' ' | '#') => number = 0,
            (true, _) => in_verb = false,
            (false, _) => {}
        }
    }
    widest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_are_read_from_every_verb() {
        assert_eq!(widest_field("%d %s"), 0);
        assert_eq!(widest_field("%0999999999d"), 999_999_999);
        assert_eq!(widest_field("a %5.300f %%"), 300);
        assert_eq!(widest_field("%-12s"), 12);
        assert_eq!(widest_field(&format!("%{}d", "9".repeat(40))), u64::MAX);
    }

    #[test]
    fn every_guard_names_a_builtin_regorus_has_with_its_arity() {
        for (name, (_, arity)) in GUARDED {
            let (_, registered) = BUILTINS.get(name).copied().expect("registered");
            assert_eq!(registered, arity, "{name}");
        }
    }
}
