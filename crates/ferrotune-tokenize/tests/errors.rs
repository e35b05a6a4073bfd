//! Loading errors name the file at fault.

mod common;

use std::fs;

use ferrotune_tokenize::{TokenizeError, Tokenizer};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("ferrotune-tokenize-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn missing_tokenizer_json_names_the_path() {
    let dir = temp_dir("missing");
    let err = Tokenizer::from_dir(&dir).unwrap_err();
    assert!(matches!(err, TokenizeError::Io { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&dir.join("tokenizer.json").display().to_string()),
        "{msg}"
    );
}

#[test]
fn malformed_tokenizer_config_names_the_file() {
    let dir = temp_dir("malformed");
    fs::copy(
        common::fixtures_dir().join("smollm2/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    fs::write(dir.join("tokenizer_config.json"), "{ \"bos_token\": ").unwrap();
    let err = Tokenizer::from_dir(&dir).unwrap_err();
    assert!(matches!(err, TokenizeError::Json { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
}

#[test]
fn wrong_field_type_names_file_and_field() {
    let dir = temp_dir("badfield");
    fs::copy(
        common::fixtures_dir().join("smollm2/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"add_bos_token": "yes"}"#,
    )
    .unwrap();
    let msg = Tokenizer::from_dir(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("tokenizer_config.json") && msg.contains("add_bos_token"),
        "{msg}"
    );
}

#[test]
fn config_fields_generation_config_and_template_list_are_read() {
    // AddedToken objects, add_bos_token, a list of named templates and generation_config eos ids.
    let dir = temp_dir("config");
    fs::copy(
        common::fixtures_dir().join("smollm2/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    fs::write(
        dir.join("tokenizer_config.json"),
        r#"{
          "bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "special": true},
          "eos_token": "<|im_end|>",
          "add_bos_token": true,
          "chat_template": [
            {"name": "default", "template": "{% for m in messages %}{{ m.content }}{% endfor %}"},
            {"name": "tool_use", "template": "T{{ tools | length }}"}
          ]
        }"#,
    )
    .unwrap();
    fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": [2, 0]}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_ids(), &[2, 0]);
    assert!(tok.add_bos_token());
    // Reference ids for "Hello world" are [19556, 905] (expected.json); BOS is prepended.
    assert_eq!(
        tok.encode("Hello world", true).unwrap(),
        vec![1, 19556, 905]
    );
    assert_eq!(tok.encode("Hello world", false).unwrap(), vec![19556, 905]);
    let msgs = [ferrotune_tokenize::Message::user("hi")];
    assert_eq!(tok.render(&msgs, false).unwrap().text, "hi");
    let tools = serde_json::json!([{"a": 1}, {"b": 2}]);
    assert_eq!(
        tok.render_with_tools(&msgs, false, Some(&tools))
            .unwrap()
            .text,
        "T2"
    );
}

#[test]
fn render_without_template_is_a_clear_error() {
    let dir = temp_dir("notemplate");
    fs::copy(
        common::fixtures_dir().join("smollm2/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let err = tok
        .render(&[ferrotune_tokenize::Message::user("hi")], false)
        .unwrap_err();
    assert!(
        matches!(err, TokenizeError::NoChatTemplate { .. }),
        "{err:?}"
    );
}
