//! Tools a policy calls during a rollout, fed what a policy may write: the calculator's
//! arithmetic and every way an expression can be hostile (code, huge or deeply nested input,
//! division by zero, non-finite results), the tool set's error replies for unknown tools and
//! bad arguments, config entries that cannot work, and a `cmd` tool's protocol (arguments as
//! JSON on stdin, stdout as the reply; a crash is an error reply).

use ferrotune_rewards::tools::{evaluate, ToolSet, ToolSpec, MAX_REPLY};
use serde_json::json;

fn spec(name: &str) -> ToolSpec {
    toml::from_str(&format!("name = \"{name}\"")).unwrap()
}

#[test]
fn calculator_evaluates_arithmetic() {
    for (expr, want) in [
        ("123 * 45", 5535.0),
        ("(1 + 2) * 3", 9.0),
        ("-3 + 5", 2.0),
        ("7 / 2", 3.5),
        ("2 - 3 - 4", -5.0),
        ("8 / 4 / 2", 1.0),
        ("3 x 4", 12.0),
        ("3 × 4", 12.0),
        ("1_000 + 1", 1001.0),
        ("--2", 2.0),
        ("  0.5*4 ", 2.0),
    ] {
        assert_eq!(evaluate(expr), Ok(want), "{expr}");
    }
    let set = ToolSet::from_specs(&[spec("calculator")]).unwrap();
    assert_eq!(
        set.call("calculator", &json!({"expression": "123 * 45"})),
        Ok("5535".into())
    );
    assert_eq!(
        set.call("calculator", &json!({"expression": "7 / 2"})),
        Ok("3.5".into())
    );
}

#[test]
fn hostile_expressions_are_error_replies() {
    let deep = format!("{}1{}", "(".repeat(40), ")".repeat(40));
    let long = "1+".repeat(150) + "1";
    for (expr, needle) in [
        ("1 / 0", "division by zero"),
        ("2 ** 3", "unexpected"),
        ("__import__('os').system('id')", "unexpected"),
        ("1e400", "unexpected"),
        ("", "ends too early"),
        ("(1 + 2", "missing `)`"),
        ("1 + 2)", "unexpected"),
        ("1..2", "not a number"),
        (deep.as_str(), "nested deeper"),
        (long.as_str(), "longer than"),
    ] {
        let e = evaluate(expr).unwrap_err();
        assert!(e.contains(needle), "{expr}: {e}");
    }
    // The largest products the length limit allows stay finite (no "inf" reply).
    let big = format!("{0} * {0} * {0} * {0} * {0}", "9".repeat(37));
    assert!(evaluate(&big).is_ok_and(|v| v.is_finite() && v > 1e184));
    let set = ToolSet::from_specs(&[spec("calculator")]).unwrap();
    for args in [
        json!({}),
        json!({"expression": 5}),
        json!({"expr": "1+1"}),
        json!([1]),
    ] {
        let e = set.call("calculator", &args).unwrap_err();
        assert!(e.contains("expression"), "{args}: {e}");
    }
    let e = set.call("search", &json!({})).unwrap_err();
    assert!(
        e.contains("unknown tool `search`") && e.contains("calculator"),
        "{e}"
    );
}

#[test]
fn tool_entries_that_cannot_work_are_refused() {
    let bad = |specs: &[ToolSpec], needle: &str| {
        let e = ToolSet::from_specs(specs).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    };
    bad(&[spec("calculator"), spec("calculator")], "twice");
    bad(&[spec("search")], "not a built-in");
    let mut c = spec("calculator");
    c.description = Some("mine".into());
    bad(&[c], "built-in calculator");
    let mut s = spec("search");
    s.cmd = Some(vec!["python3".into(), "-c".into(), "print(1)".into()]);
    bad(std::slice::from_ref(&s), "description");
    s.description = Some("d".into());
    bad(std::slice::from_ref(&s), "parameters");
    s.parameters = Some(json!([1]));
    bad(std::slice::from_ref(&s), "parameters");
    s.parameters = Some(json!({"type": "object"}));
    s.timeout_s = 0.0;
    bad(std::slice::from_ref(&s), "timeout_s");
    s.timeout_s = 5.0;
    s.cmd = Some(vec!["no-such-program-here".into()]);
    bad(std::slice::from_ref(&s), "not on PATH");
    assert!(toml::from_str::<ToolSpec>("name = \"x\"\nbogus = 1").is_err());
}

#[test]
fn a_command_tool_reads_json_and_replies_with_stdout() {
    let tool = |code: &str| -> ToolSpec {
        let mut s = spec("echo");
        s.cmd = Some(vec!["python3".into(), "-c".into(), code.into()]);
        s.description = Some("echo its arguments".into());
        s.parameters = Some(json!({"type": "object", "properties": {"q": {"type": "string"}}}));
        s
    };
    let set = ToolSet::from_specs(&[tool(
        "import json, sys; a = json.load(sys.stdin); print(json.dumps({'got': a['q']}))",
    )])
    .unwrap();
    assert_eq!(
        set.call("echo", &json!({"q": "hi"})),
        Ok("{\"got\": \"hi\"}".into())
    );
    let schema = &set.schemas()[0];
    assert_eq!(schema["function"]["name"], "echo");
    assert_eq!(schema["function"]["parameters"]["type"], "object");
    // A crash is an error reply naming the tool; a flood of output is cut.
    let crash = ToolSet::from_specs(&[tool("import sys; sys.exit(3)")]).unwrap();
    let e = crash.call("echo", &json!({})).unwrap_err();
    assert!(e.contains("tool `echo` failed"), "{e}");
    let flood = ToolSet::from_specs(&[tool("print('x' * 50000)")]).unwrap();
    let r = flood.call("echo", &json!({})).unwrap();
    assert!(
        r.len() < MAX_REPLY + 40 && r.ends_with("bytes]"),
        "{}",
        r.len()
    );
}
