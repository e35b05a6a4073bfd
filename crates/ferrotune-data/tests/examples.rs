//! TRL's column conventions: which format a dataset is, the typed examples, and errors that
//! point at the row and column.

mod common;

use common::{data_fixtures, temp_dir, write};
use ferrotune_data::{
    detect_sft_format, preference_examples, prompt_examples, read_rows, sft_examples, DataError,
    Example, Segment, SftFormat,
};
use ferrotune_tokenize::Message;
use serde_json::json;

#[test]
fn format_is_picked_messages_then_prompt_completion_then_text() {
    let dir = temp_dir("detect");
    let cases = [
        (
            "{\"messages\": [], \"prompt\": \"p\", \"completion\": \"c\", \"text\": \"t\"}",
            SftFormat::Messages,
        ),
        (
            "{\"prompt\": \"p\", \"completion\": \"c\", \"text\": \"t\"}",
            SftFormat::PromptCompletion,
        ),
        ("{\"text\": \"t\", \"other\": 1}", SftFormat::Text),
    ];
    for (i, (line, want)) in cases.iter().enumerate() {
        let path = write(&dir, &format!("{i}.jsonl"), line);
        let rows = read_rows(&path).unwrap();
        assert_eq!(detect_sft_format(&rows[0], &path).unwrap(), *want, "{line}");
    }
    let path = write(&dir, "none.jsonl", "{\"question\": \"q\"}");
    let msg = sft_examples(&read_rows(&path).unwrap(), &path)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("none.jsonl:1:") && msg.contains("`question`"),
        "{msg}"
    );
}

#[test]
fn parquet_fixture_gives_conversations_and_prompt_completion() {
    let path = data_fixtures().join("tiny.parquet");
    let rows = read_rows(&path).unwrap();
    let examples = sft_examples(&rows, &path).unwrap();
    assert_eq!(
        examples[1],
        Example::Messages {
            messages: vec![
                Message::system("You are terse."),
                Message::user("Name a colour."),
                Message::assistant("Blue."),
            ]
        }
    );
    // Without `messages`, the same rows are prompt/completion.
    let mut pc_rows = rows.clone();
    for r in &mut pc_rows {
        r.fields.remove("messages");
    }
    let pc = sft_examples(&pc_rows, &path).unwrap();
    assert_eq!(
        pc[0],
        Example::PromptCompletion {
            prompt: Segment::Text("What is 2+2?".into()),
            completion: Segment::Text(" 4".into()),
        }
    );
}

#[test]
fn missing_column_names_file_and_line() {
    let dir = temp_dir("missing");
    let path = write(
        &dir,
        "pc.jsonl",
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"c\"}\n",
    );
    let err = sft_examples(&read_rows(&path).unwrap(), &path).unwrap_err();
    assert!(
        matches!(&err, DataError::MissingColumn { line: 2, column, .. } if column == "completion"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.ends_with("pc.jsonl:2: missing column `completion`"),
        "{msg}"
    );

    // CSV: the first record is on line 2.
    let csv = write(&dir, "t.csv", "prompt\nhello\n");
    let msg = sft_examples(&read_rows(&csv).unwrap(), &csv)
        .unwrap_err()
        .to_string();
    assert!(
        msg.ends_with("t.csv:2: missing column `completion`"),
        "{msg}"
    );
}

#[test]
fn wrong_types_name_the_nested_column() {
    let dir = temp_dir("types");
    let path = write(
        &dir,
        "m.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": 5}]}\n",
    );
    let msg = sft_examples(&read_rows(&path).unwrap(), &path)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("m.jsonl:2:"), "{msg}");
    assert!(
        msg.contains("`messages[1].content` must be a string, found a number"),
        "{msg}"
    );

    let path = write(&dir, "t.jsonl", "{\"text\": null}\n");
    let msg = sft_examples(&read_rows(&path).unwrap(), &path)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("t.jsonl:1: column `text` must be a string, found null"),
        "{msg}"
    );

    let path = write(&dir, "r.jsonl", "{\"messages\": [{\"content\": \"hi\"}]}\n");
    let msg = sft_examples(&read_rows(&path).unwrap(), &path)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("r.jsonl:1: missing column `messages[0].role`"),
        "{msg}"
    );
}

#[test]
fn csv_messages_column_may_hold_json() {
    let dir = temp_dir("csvmsg");
    let path = write(
        &dir,
        "m.csv",
        "messages\n\"[{\"\"role\"\": \"\"user\"\", \"\"content\"\": \"\"hi\"\"}]\"\nnot json\n",
    );
    let rows = read_rows(&path).unwrap();
    let first = sft_examples(&rows[..1], &path).unwrap();
    assert_eq!(
        first[0],
        Example::Messages {
            messages: vec![Message::user("hi")]
        }
    );
    let msg = sft_examples(&rows, &path).unwrap_err().to_string();
    assert!(
        msg.contains("m.csv:3:") && msg.contains("not JSON"),
        "{msg}"
    );
}

#[test]
fn conversational_prompt_completion() {
    let dir = temp_dir("convpc");
    let path = write(
        &dir,
        "c.jsonl",
        "{\"prompt\": [{\"role\": \"user\", \"content\": \"2+2?\"}], \
          \"completion\": [{\"role\": \"assistant\", \"content\": \"4\"}]}\n",
    );
    let ex = sft_examples(&read_rows(&path).unwrap(), &path).unwrap();
    assert_eq!(
        ex[0],
        Example::PromptCompletion {
            prompt: Segment::Chat(vec![Message::user("2+2?")]),
            completion: Segment::Chat(vec![Message::assistant("4")]),
        }
    );
}

#[test]
fn preference_with_explicit_and_implicit_prompt() {
    let dir = temp_dir("pref");
    let path = write(
        &dir,
        "p.jsonl",
        "{\"prompt\": \"Q\", \"chosen\": \" yes\", \"rejected\": \" no\"}\n\
         {\"chosen\": \"The sky is blue\", \"rejected\": \"The sky is green\"}\n\
         {\"chosen\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}], \
           \"rejected\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"go away\"}]}\n",
    );
    let ex = preference_examples(&read_rows(&path).unwrap(), &path).unwrap();
    let text = |s: &str| Segment::Text(s.into());
    assert_eq!(
        ex[0],
        Example::Preference {
            prompt: text("Q"),
            chosen: text(" yes"),
            rejected: text(" no")
        }
    );
    // As TRL's `extract_prompt`: the space before the first difference goes to the answers.
    assert_eq!(
        ex[1],
        Example::Preference {
            prompt: text("The sky is"),
            chosen: text(" blue"),
            rejected: text(" green"),
        }
    );
    assert_eq!(
        ex[2],
        Example::Preference {
            prompt: Segment::Chat(vec![Message::user("hi")]),
            chosen: Segment::Chat(vec![Message::assistant("hello")]),
            rejected: Segment::Chat(vec![Message::assistant("go away")]),
        }
    );
}

#[test]
fn grpo_prompts_keep_answer_and_extra_columns() {
    let path = data_fixtures().join("tiny.parquet");
    let ex = prompt_examples(&read_rows(&path).unwrap(), &path).unwrap();
    let Example::Prompt {
        prompt,
        answer,
        fields,
    } = &ex[0]
    else {
        panic!("{:?}", ex[0]);
    };
    assert_eq!(prompt, &Segment::Text("What is 2+2?".into()));
    assert_eq!(answer.as_deref(), Some("4"));
    assert_eq!(fields["id"], json!(1));
    assert!(!fields.contains_key("prompt"));
    // A null answer (row 2) is no answer.
    let Example::Prompt { answer, .. } = &ex[1] else {
        panic!()
    };
    assert_eq!(answer, &None);

    let dir = temp_dir("grpo");
    let p = write(
        &dir,
        "g.jsonl",
        "{\"prompt\": \"x\", \"answer\": 72}\n{\"prompt\": \"y\", \"answer\": [1]}\n",
    );
    let rows = read_rows(&p).unwrap();
    let Example::Prompt { answer, .. } = &prompt_examples(&rows[..1], &p).unwrap()[0] else {
        panic!()
    };
    assert_eq!(answer.as_deref(), Some("72"));
    let msg = prompt_examples(&rows, &p).unwrap_err().to_string();
    assert!(msg.contains("g.jsonl:2: column `answer`"), "{msg}");
}
