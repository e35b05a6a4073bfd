//! `ferrotune tokenize` and `--chat-template` through the binary: a dataset row's ids and SFT
//! mask equal transformers' (`return_assistant_tokens_mask`, fixtures/tokenize/expected.json),
//! templates that train nothing or never train the end of a turn are warned about, and a model
//! without a template refuses `--chat` in one line that says how to give one. The Gemma 3 cases
//! run when FERROTUNE_GEMMA3_GGUF points at the real model (`scripts/fetch-gemma3.sh`; CI does).

mod common;

use std::path::PathBuf;

use common::{ferrotune, ok, root};
use serde_json::Value;

fn smollm2() -> String {
    root()
        .join("fixtures/tokenize/smollm2")
        .display()
        .to_string()
}

fn write_rows(dir: &std::path::Path, rows: &[Value]) -> String {
    let p = dir.join("rows.jsonl");
    let text: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    std::fs::write(&p, text.join("\n") + "\n").unwrap();
    p.display().to_string()
}

fn json_out(args: &[&str]) -> (Value, String) {
    let out = ferrotune(args);
    let stdout = ok(&out);
    let v = serde_json::from_str(stdout.trim()).unwrap();
    (v, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The token strings `tokenize --json` marks as trained, in order.
fn trained_tokens(v: &Value) -> Vec<String> {
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .zip(v["trained"].as_array().unwrap())
        .filter(|(_, m)| m == &&Value::from(1))
        .map(|(t, _)| t.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_dataset_row_gives_transformers_ids_and_mask() {
    let text = std::fs::read_to_string(root().join("fixtures/tokenize/expected.json")).unwrap();
    let exp: Value = serde_json::from_str(&text).unwrap();
    let case = &exp["assistant_mask"][0];
    assert_eq!(case["template"], "smollm2");
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(
        tmp.path(),
        &[serde_json::json!({"messages": case["messages"]})],
    );
    let (v, stderr) = json_out(&["tokenize", "--model", &smollm2(), "--data", &data, "--json"]);
    assert_eq!(v["ids"], case["ids"]);
    assert_eq!(v["trained"], case["assistant_mask"]);
    assert!(!stderr.contains("warning"), "{stderr}");
    // The table says the same.
    let table = ok(&ferrotune(&[
        "tokenize",
        "--model",
        &smollm2(),
        "--data",
        &data,
    ]));
    let n = case["assistant_mask"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m == &&Value::from(1))
        .count();
    let n_ids = case["ids"].as_array().unwrap().len();
    assert!(
        table.ends_with(&format!("{n_ids} tokens, {n} trained\n")),
        "{table}"
    );
}

#[test]
fn templates_that_train_nothing_or_never_stop_are_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    // No end-of-turn token: the reply is trained but nothing teaches the model to stop.
    let bare = tmp.path().join("bare.jinja");
    std::fs::write(
        &bare,
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
    )
    .unwrap();
    let conv = serde_json::json!({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]});
    let data = write_rows(tmp.path(), &[conv]);
    let bare_s = bare.display().to_string();
    let (v, stderr) = json_out(&[
        "tokenize",
        "--model",
        &smollm2(),
        "--chat-template",
        &bare_s,
        "--data",
        &data,
        "--json",
    ]);
    assert!(v["trained"].as_array().unwrap().contains(&Value::from(1)));
    assert!(
        stderr.contains("warning: the trained span ending at token"),
        "{stderr}"
    );
    assert!(stderr.contains("will not learn to stop"), "{stderr}");
    // The model's own template ends each reply with <|im_end|>: no warning.
    let (_, stderr) = json_out(&["tokenize", "--model", &smollm2(), "--data", &data, "--json"]);
    assert!(!stderr.contains("warning"), "{stderr}");
    // No assistant turn: nothing is trained.
    let prompt_only = write_rows(
        tmp.path(),
        &[serde_json::json!({"messages": [{"role": "user", "content": "hi"}]})],
    );
    let (v, stderr) = json_out(&[
        "tokenize",
        "--model",
        &smollm2(),
        "--data",
        &prompt_only,
        "--json",
    ]);
    assert!(!v["trained"].as_array().unwrap().contains(&Value::from(1)));
    assert!(stderr.contains("warning: no token is trained"), "{stderr}");
}

#[test]
fn bad_tokenize_input_is_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), &[serde_json::json!({"text": "a"})]);
    for (args, want) in [
        (
            vec!["--data", data.as_str(), "--row", "3"],
            "--row 3 but the file has 1 rows",
        ),
        (
            vec!["--text", "a", "--chat-template", "/nonexistent.jinja"],
            "/nonexistent.jinja: chat template",
        ),
    ] {
        let mut all = vec!["tokenize", "--model"];
        let m = smollm2();
        all.push(&m);
        all.extend(args);
        let out = ferrotune(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(want),
            "{stderr}"
        );
    }
}

fn gemma3() -> Option<String> {
    let p = PathBuf::from(std::env::var_os("FERROTUNE_GEMMA3_GGUF")?);
    assert!(
        p.is_file(),
        "FERROTUNE_GEMMA3_GGUF={} is not a file",
        p.display()
    );
    Some(p.display().to_string())
}

#[test]
fn gemma3_base_needs_a_template_for_chat_and_trains_end_of_turn() {
    let Some(model) = gemma3() else {
        println!("skipped: no Gemma 3 GGUF (set FERROTUNE_GEMMA3_GGUF; scripts/fetch-gemma3.sh)");
        return;
    };
    let out = ferrotune(&[
        "generate",
        "--model",
        &model,
        "--chat",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for want in ["error: no chat template", &model, "--chat-template FILE"] {
        assert!(stderr.contains(want), "`{want}` not in {stderr}");
    }
    let template = root()
        .join("configs/templates/gemma3.jinja")
        .display()
        .to_string();
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(
        tmp.path(),
        &[serde_json::json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]})],
    );
    let (v, stderr) = json_out(&[
        "tokenize",
        "--model",
        &model,
        "--chat-template",
        &template,
        "--data",
        &data,
        "--json",
    ]);
    assert!(!stderr.contains("warning"), "{stderr}");
    let tokens: Vec<&str> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(trained_tokens(&v), ["5", "<end_of_turn>"]);
    assert_eq!(tokens[..4], ["<bos>", "<start_of_turn>", "user", "\n"]);
    // generate --chat with the template runs (and stops on <end_of_turn> or <eos> if sampled).
    let out = ferrotune(&[
        "generate",
        "--model",
        &model,
        "--chat",
        "--chat-template",
        &template,
        "--prompt",
        "2+3?",
        "--max-new-tokens",
        "4",
    ]);
    ok(&out);
}

/// `data gen arithmetic --sft` writes conversations whose reply is the right `<answer>N</answer>`,
/// and SFT trains exactly that reply and its end-of-turn.
#[test]
fn generated_sft_conversations_train_the_tagged_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sft.jsonl").display().to_string();
    ok(&ferrotune(&[
        "data",
        "gen",
        "arithmetic",
        "--n",
        "30",
        "--seed",
        "3",
        "--digits",
        "1..2",
        "--ops",
        "+-*",
        "--chat",
        "--system",
        "Tag it.",
        "--sft",
        "--out",
        &out,
    ]));
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count(), 30);
    for (i, line) in text.lines().enumerate() {
        let row: Value = serde_json::from_str(line).unwrap();
        let m = row["messages"].as_array().unwrap();
        let roles: Vec<&str> = m.iter().map(|x| x["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["system", "user", "assistant"], "{line}");
        let q = m[1]["content"].as_str().unwrap();
        let expr = q
            .strip_prefix("What is ")
            .and_then(|r| r.strip_suffix('?'))
            .unwrap();
        let parts: Vec<&str> = expr.split(' ').collect();
        let (a, b): (i64, i64) = (parts[0].parse().unwrap(), parts[2].parse().unwrap());
        let want = match parts[1] {
            "+" => a + b,
            "-" => a - b,
            "*" => a * b,
            op => panic!("{op}"),
        };
        assert_eq!(
            m[2]["content"],
            format!("<answer>{want}</answer>"),
            "{line}"
        );
        if i < 3 {
            let row_s = i.to_string();
            let (v, stderr) = json_out(&[
                "tokenize",
                "--model",
                &smollm2(),
                "--data",
                &out,
                "--row",
                &row_s,
                "--json",
            ]);
            assert!(!stderr.contains("warning"), "{stderr}");
            assert_eq!(
                trained_tokens(&v).concat(),
                format!("<answer>{want}</answer><|im_end|>")
            );
        }
    }
    // Without --chat there is no conversation to write.
    let o = ferrotune(&[
        "data",
        "gen",
        "arithmetic",
        "--n",
        "4",
        "--sft",
        "--out",
        &out,
    ]);
    assert!(!o.status.success());
}
