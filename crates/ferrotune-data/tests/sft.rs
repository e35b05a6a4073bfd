//! SFT tokenization with the committed SmolLM2 tokenizer (`fixtures/tokenize/smollm2/`, from
//! `fixtures/tokenize/make_tokenize_fixtures.py`): the loss mask covers exactly the completion
//! (or the assistant turns) plus the end token, truncation is counted, and examples with nothing
//! left to train on are counted and skippable.

mod common;

use common::smollm2;
use ferrotune_data::{
    tokenize_sft, tokenize_sft_all, Example, Segment, SftOptions, Tokenized, TruncationStats,
};
use ferrotune_tokenize::{Message, Tokenizer};

fn masked(t: &Tokenized) -> Vec<u32> {
    t.ids
        .iter()
        .zip(&t.loss_mask)
        .filter(|(_, &m)| m == 1)
        .map(|(&id, _)| id)
        .collect()
}

fn unmasked(t: &Tokenized) -> Vec<u32> {
    t.ids
        .iter()
        .zip(&t.loss_mask)
        .filter(|(_, &m)| m == 0)
        .map(|(&id, _)| id)
        .collect()
}

fn pc(prompt: &str, completion: &str) -> Example {
    Example::PromptCompletion {
        prompt: Segment::Text(prompt.into()),
        completion: Segment::Text(completion.into()),
    }
}

fn decode(tok: &Tokenizer, ids: &[u32]) -> String {
    tok.decode(ids, false).unwrap()
}

#[test]
fn plain_completion_mask_is_the_completion_plus_eos() {
    let tok = smollm2();
    let eos = tok.eos_token().unwrap().to_string();
    assert_eq!(eos, "<|im_end|>");
    for (prompt, completion) in [
        ("What is 2+2?", " 4"),
        ("Translate to French: cat", " chat, le félin."),
        ("def add(a, b):", "\n    return a + b\n"),
    ] {
        let t = tokenize_sft(&tok, &pc(prompt, completion), 1024, &SftOptions::default()).unwrap();
        assert_eq!(t.ids.len(), t.loss_mask.len());
        assert!(!t.truncated);
        assert_eq!(decode(&tok, &masked(&t)), format!("{completion}{eos}"));
        assert_eq!(decode(&tok, &unmasked(&t)), prompt);
        // The trained tokens are one block at the end.
        let first = t.loss_mask.iter().position(|&m| m == 1).unwrap();
        assert!(t.loss_mask[first..].iter().all(|&m| m == 1));
        assert_eq!(t.ids.last(), tok.eos_ids().first());
    }
}

#[test]
fn eos_is_not_doubled_when_the_completion_ends_with_it() {
    let tok = smollm2();
    let a = tokenize_sft(&tok, &pc("Q:", " yes"), 64, &SftOptions::default()).unwrap();
    let b = tokenize_sft(
        &tok,
        &pc("Q:", " yes<|im_end|>"),
        64,
        &SftOptions::default(),
    )
    .unwrap();
    assert_eq!(a, b);
    let eos = tok.eos_ids()[0];
    assert_eq!(a.ids.iter().filter(|&&i| i == eos).count(), 1);
}

#[test]
fn messages_mask_covers_assistant_turns_only() {
    let tok = smollm2();
    let messages = vec![
        Message::user("Say hi in French."),
        Message::assistant("Bonjour !"),
        Message::user("And in German?"),
        Message::assistant("Hallo!"),
    ];
    let ex = Example::Messages { messages };
    let t = tokenize_sft(&tok, &ex, 1024, &SftOptions::default()).unwrap();
    assert_eq!(
        decode(&tok, &masked(&t)),
        "Bonjour !<|im_end|>Hallo!<|im_end|>"
    );
    // The whole render is ids; the mask does not change which ids there are.
    let all = tokenize_sft(
        &tok,
        &ex,
        1024,
        &SftOptions {
            assistant_only_loss: false,
            ..SftOptions::default()
        },
    )
    .unwrap();
    assert_eq!(all.ids, t.ids);
    assert!(all.loss_mask.iter().all(|&m| m == 1));
}

#[test]
fn conversational_prompt_completion_masks_only_the_completion_turn() {
    let tok = smollm2();
    let ex = Example::PromptCompletion {
        prompt: Segment::Chat(vec![
            Message::user("2+2?"),
            Message::assistant("5"),
            Message::user("Sure?"),
        ]),
        completion: Segment::Chat(vec![Message::assistant("No, 4.")]),
    };
    let t = tokenize_sft(&tok, &ex, 1024, &SftOptions::default()).unwrap();
    assert_eq!(decode(&tok, &masked(&t)), "No, 4.<|im_end|>");

    let mixed = Example::PromptCompletion {
        prompt: Segment::Chat(vec![Message::user("2+2?")]),
        completion: Segment::Text("4".into()),
    };
    let msg = tokenize_sft(&tok, &mixed, 64, &SftOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("both be text or both be message lists"),
        "{msg}"
    );
}

#[test]
fn text_trains_every_token_and_ends_with_eos() {
    let tok = smollm2();
    let t = tokenize_sft(
        &tok,
        &Example::Text {
            text: "Once upon a time".into(),
        },
        64,
        &SftOptions::default(),
    )
    .unwrap();
    assert_eq!(decode(&tok, &t.ids), "Once upon a time<|im_end|>");
    assert!(t.loss_mask.iter().all(|&m| m == 1));
}

#[test]
fn completion_only_loss_off_trains_the_prompt_too() {
    let tok = smollm2();
    let opts = SftOptions {
        completion_only_loss: false,
        ..SftOptions::default()
    };
    let t = tokenize_sft(&tok, &pc("What is 2+2?", " 4"), 64, &opts).unwrap();
    assert!(t.loss_mask.iter().all(|&m| m == 1));
    assert_eq!(decode(&tok, &t.ids), "What is 2+2? 4<|im_end|>");
}

#[test]
fn truncation_is_from_the_right_and_counted() {
    let tok = smollm2();
    let opts = SftOptions::default();
    let long = pc(
        "Count:",
        " one two three four five six seven eight nine ten",
    );
    let full = tokenize_sft(&tok, &long, 1024, &opts).unwrap();
    let cut = tokenize_sft(&tok, &long, 6, &opts).unwrap();
    assert!(cut.truncated);
    assert_eq!(cut.ids, full.ids[..6]);
    assert_eq!(cut.loss_mask, full.loss_mask[..6]);
    assert_eq!(cut.tokens_dropped, full.ids.len() - 6);

    // A prompt longer than the budget leaves no trained token.
    let no_loss = pc("a b c d e f g h i j k l m n o p", " z");
    let examples = vec![pc("Q:", " yes"), long.clone(), no_loss];
    let set = tokenize_sft_all(&tok, &examples, 6, &opts, true).unwrap();
    let n_prompt = tok
        .encode("a b c d e f g h i j k l m n o p", true)
        .unwrap()
        .len();
    let n_short = full.ids.len();
    assert_eq!(
        set.stats,
        TruncationStats {
            examples: 3,
            truncated: 2,
            tokens_dropped: (n_short - 6) + (n_prompt + 2 - 6),
            no_loss: 1,
        }
    );
    assert_eq!(set.source, vec![0, 1]);
    assert_eq!(set.items.len(), 2);
    assert!((set.stats.truncated_fraction() - 2.0 / 3.0).abs() < 1e-12);

    let kept = tokenize_sft_all(&tok, &examples, 6, &opts, false).unwrap();
    assert_eq!(kept.source, vec![0, 1, 2]);
    assert!(!kept.items[2].has_loss());
}

#[test]
fn non_sft_examples_and_zero_length_are_refused() {
    let tok = smollm2();
    let ex = Example::Preference {
        prompt: Segment::Text("p".into()),
        chosen: Segment::Text("a".into()),
        rejected: Segment::Text("b".into()),
    };
    assert!(tokenize_sft(&tok, &ex, 8, &SftOptions::default()).is_err());
    assert!(tokenize_sft(&tok, &pc("a", "b"), 0, &SftOptions::default()).is_err());
}
