//! The generated pretraining corpus of the embedded demo model: arithmetic written as text
//! (equations, questions, word problems, some ChatML exchanges) and simple English stories from
//! templates. Everything is a pure function of a seed, so the committed config regenerates the
//! same corpus, and the text is ours (no licence to track).
//!
//! Owns: the templates, the held-out rules and the seeded generator. Does not own:
//! tokenization, training, or the demo's SFT format (`<answer>N</answer>` replies are taught by
//! the demo's SFT; here `<answer>` only appears inside free text).
//!
//! Held out: an arithmetic problem `(a, op, b)` for which [`is_held_out`] is true never appears
//! in the training corpus (the demo measures accuracy on those), and English stories whose text
//! hashes into the held-out bucket are only written to the held-out file (perplexity).

use ferrotune_nn::splitmix64;
use serde::{Deserialize, Serialize};

/// A small deterministic generator (splitmix64 counter): the same on every platform and
/// independent of any crate's version.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(splitmix64(seed ^ 0x5EED_C0FF_EE00_0001))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix64(self.0)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as i64
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / ((1u64 << 53) as f64) < p
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next_u64() % items.len() as u64) as usize]
    }
    /// Fisher–Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// FNV-1a, for the held-out buckets.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// One problem in ten is held out: never trained on, used by the demo to measure accuracy.
/// The rule is fixed (not seeded) so every regenerated corpus holds out the same problems.
pub fn is_held_out(a: i64, op: char, b: i64) -> bool {
    splitmix64(fnv(format!("{a}{op}{b}").as_bytes())).is_multiple_of(10)
}

/// One story in ten (by its text) goes to the held-out English file only.
pub fn is_held_out_text(text: &str) -> bool {
    (splitmix64(fnv(text.as_bytes()) ^ 0xE46)).is_multiple_of(10)
}

/// An arithmetic problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Problem {
    pub a: i64,
    pub op: char,
    pub b: i64,
}

impl Problem {
    pub fn answer(&self) -> i64 {
        match self.op {
            '+' => self.a + self.b,
            '-' => self.a - self.b,
            _ => self.a * self.b,
        }
    }
    pub fn expr(&self) -> String {
        format!("{} {} {}", self.a, self.op, self.b)
    }
    pub fn held_out(&self) -> bool {
        is_held_out(self.a, self.op, self.b)
    }
}

/// What to generate (the `[corpus]` section of a pretrain config).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CorpusSpec {
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Documents of a few arithmetic lines each (equations, questions, word problems).
    #[serde(default = "d_arith")]
    pub arithmetic_docs: usize,
    /// ChatML exchanges about arithmetic (`<|im_start|>user ... <|im_end|>`).
    #[serde(default = "d_chat")]
    pub chat_docs: usize,
    /// Short English stories from templates.
    #[serde(default = "d_english")]
    pub english_docs: usize,
    /// Held-out English stories written to `eval/english.txt` (never trained on).
    #[serde(default = "d_heldout_english")]
    pub heldout_english_docs: usize,
    /// Held-out arithmetic problems written to `eval/arithmetic.jsonl` (never trained on):
    /// + and - with both operands up to `max_operand`, the demo's task.
    #[serde(default = "d_heldout_arith")]
    pub heldout_arithmetic: usize,
    /// Largest operand of the common problems (1–2 digits by default).
    #[serde(default = "d_max_operand")]
    pub max_operand: i64,
    /// Fraction of problems with a 3-digit first operand.
    #[serde(default = "d_three_digit")]
    pub three_digit_fraction: f64,
    /// Fraction of problems that are single-digit products.
    #[serde(default = "d_mul")]
    pub multiplication_fraction: f64,
    /// Extra UTF-8 text files trained on as well (read by the pretrain runner, not here);
    /// documents are separated by blank lines. Relative to the config file.
    #[serde(default)]
    pub files: Vec<std::path::PathBuf>,
}

serde_defaults! {
    d_seed: u64 = 1;
    d_arith: usize = 20000;
    d_chat: usize = 8000;
    d_english: usize = 12000;
    d_heldout_english: usize = 200;
    d_heldout_arith: usize = 300;
    d_max_operand: i64 = 99;
    d_three_digit: f64 = 0.1;
    d_mul: f64 = 0.1;
}

impl Default for CorpusSpec {
    fn default() -> Self {
        CorpusSpec {
            seed: d_seed(),
            arithmetic_docs: d_arith(),
            chat_docs: d_chat(),
            english_docs: d_english(),
            heldout_english_docs: d_heldout_english(),
            heldout_arithmetic: d_heldout_arith(),
            max_operand: d_max_operand(),
            three_digit_fraction: d_three_digit(),
            multiplication_fraction: d_mul(),
            files: Vec::new(),
        }
    }
}

/// The generated texts.
#[derive(Debug, Clone, Default)]
pub struct Corpus {
    /// Training documents (each ends where an `<|endoftext|>` will go).
    pub train: Vec<String>,
    /// Held-out English stories.
    pub heldout_english: Vec<String>,
    /// Held-out problems (none of them appears in `train`).
    pub heldout_arithmetic: Vec<Problem>,
}

/// A problem drawn from the spec's mix (held-out ones included; callers filter).
pub fn draw_problem(rng: &mut Rng, spec: &CorpusSpec) -> Problem {
    if rng.chance(spec.multiplication_fraction) {
        return Problem {
            a: rng.range(0, 9),
            op: '*',
            b: rng.range(0, 9),
        };
    }
    let op = if rng.chance(0.5) { '+' } else { '-' };
    let a = if rng.chance(spec.three_digit_fraction) {
        rng.range(100, 999)
    } else {
        rng.range(0, spec.max_operand)
    };
    let b = rng.range(0, spec.max_operand);
    // Mostly non-negative differences (as in school problems), some negative ones.
    let (a, b) = if op == '-' && a < b && !rng.chance(0.15) {
        (b, a)
    } else {
        (a, b)
    };
    Problem { a, op, b }
}

/// A training problem: redrawn until it is not held out.
fn train_problem(rng: &mut Rng, spec: &CorpusSpec) -> Problem {
    loop {
        let p = draw_problem(rng, spec);
        if !p.held_out() {
            return p;
        }
    }
}

const NAMES: &[&str] = &[
    "Mia", "Tom", "Lily", "Sam", "Ben", "Anna", "Leo", "Zoe", "Max", "Ella", "Noah", "Ivy", "Jack",
    "Lucy", "Omar", "Nina",
];
const THINGS: &[&str] = &[
    "apples", "pencils", "marbles", "stickers", "cookies", "books", "shells", "coins", "stamps",
    "cards", "flowers", "balloons",
];

fn word_op(op: char) -> &'static str {
    match op {
        '+' => "plus",
        '-' => "minus",
        _ => "times",
    }
}

/// One line of arithmetic text in one of several styles.
fn arithmetic_line(rng: &mut Rng, p: &Problem) -> String {
    let (e, r) = (p.expr(), p.answer());
    match rng.range(0, 9) {
        0..=2 => format!("{e} = {r}"),
        3 => format!("What is {e}? {r}"),
        4 => format!("Q: What is {e}?\nA: {r}"),
        5 => format!("{} {} {} is {r}.", p.a, word_op(p.op), p.b),
        6 => format!("The answer to {e} is <answer>{r}</answer>."),
        7 => format!("Compute {e}. The result is {r}."),
        8 => format!("{e} equals {r}."),
        _ => word_problem(rng, p).unwrap_or_else(|| format!("{e} = {r}")),
    }
}

/// A one-sentence-per-step story for + and - with a non-negative result.
fn word_problem(rng: &mut Rng, p: &Problem) -> Option<String> {
    let name = rng.pick(NAMES);
    let thing = rng.pick(THINGS);
    match p.op {
        '+' => Some(format!(
            "{name} has {} {thing}. {name} gets {} more. Now {name} has {} {thing}.",
            p.a,
            p.b,
            p.answer()
        )),
        '-' if p.answer() >= 0 => Some(format!(
            "{name} has {} {thing} and gives away {}. {name} has {} {thing} left.",
            p.a,
            p.b,
            p.answer()
        )),
        _ => None,
    }
}

fn arithmetic_doc(rng: &mut Rng, spec: &CorpusSpec) -> String {
    let n = rng.range(2, 6);
    let mut lines = Vec::new();
    // Some documents are drills: one style, consecutive problems.
    if rng.chance(0.3) {
        for _ in 0..n {
            let p = train_problem(rng, spec);
            lines.push(format!("{} = {}", p.expr(), p.answer()));
        }
    } else {
        for _ in 0..n {
            let p = train_problem(rng, spec);
            lines.push(arithmetic_line(rng, &p));
        }
    }
    lines.join("\n")
}

fn chat_doc(rng: &mut Rng, spec: &CorpusSpec) -> String {
    let mut out = String::new();
    if rng.chance(0.2) {
        out.push_str("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n");
    }
    let turns = rng.range(1, 2);
    for _ in 0..turns {
        let p = train_problem(rng, spec);
        let (e, r) = (p.expr(), p.answer());
        let question = match rng.range(0, 3) {
            0 => format!("What is {e}?"),
            1 => format!("Compute {e}."),
            2 => format!("{e} = ?"),
            _ => format!("What is {} {} {}?", p.a, word_op(p.op), p.b),
        };
        let reply = match rng.range(0, 3) {
            0 => format!("{r}"),
            1 => format!("{e} = {r}"),
            2 => format!("The answer is {r}."),
            _ => format!("{e} = {r}. The answer is {r}."),
        };
        out.push_str(&format!(
            "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{reply}<|im_end|>\n"
        ));
    }
    out
}

const ADJ: &[&str] = &[
    "big", "small", "red", "blue", "green", "happy", "little", "old", "new", "shiny", "soft",
    "warm", "quiet", "funny", "brave", "kind",
];
const ANIMALS: &[&str] = &[
    "cat", "dog", "bird", "rabbit", "fox", "bear", "frog", "duck", "mouse", "horse",
];
const OBJECTS: &[&str] = &[
    "ball", "box", "kite", "hat", "book", "cup", "boat", "drum", "key", "map", "lamp", "bag",
];
const PLACES: &[&str] = &[
    "park", "garden", "forest", "house", "school", "river", "beach", "farm", "shop", "hill",
];
const FEELINGS: &[&str] = &[
    "happy",
    "sad",
    "tired",
    "excited",
    "surprised",
    "proud",
    "scared",
];
const WEATHER: &[&str] = &["sunny", "rainy", "windy", "cold", "warm", "cloudy"];
const FOODS: &[&str] = &[
    "bread", "soup", "cake", "apples", "rice", "pie", "milk", "eggs",
];
const VERBS: &[&str] = &[
    "play", "run", "read", "sing", "draw", "swim", "jump", "dance",
];

/// A short story: a named child, an animal or object, a place, what happened, how it ended.
fn english_doc(rng: &mut Rng) -> String {
    let name = *rng.pick(NAMES);
    let friend = *rng.pick(NAMES);
    let animal = *rng.pick(ANIMALS);
    let object = *rng.pick(OBJECTS);
    let place = *rng.pick(PLACES);
    let adj = *rng.pick(ADJ);
    let feel = *rng.pick(FEELINGS);
    let mut s: Vec<String> = Vec::new();
    s.push(match rng.range(0, 3) {
        0 => format!("Once upon a time, there was a {adj} {animal} named {name}."),
        1 => format!(
            "It was a {} day, and {name} went to the {place}.",
            rng.pick(WEATHER)
        ),
        2 => format!("{name} had a {adj} {object}."),
        _ => format!("One morning, {name} woke up and looked out of the window."),
    });
    for _ in 0..rng.range(2, 5) {
        let line = match rng.range(0, 11) {
            0 => format!("{name} liked to {} with {friend}.", rng.pick(VERBS)),
            1 => format!("In the {place}, {name} saw a {} {animal}.", rng.pick(ADJ)),
            2 => format!(
                "The {animal} was {} and very {}.",
                rng.pick(ADJ),
                rng.pick(ADJ)
            ),
            3 => format!("\"Look at my {object}!\" said {name}."),
            4 => format!("{friend} said, \"Can I {} too?\"", rng.pick(VERBS)),
            5 => format!("They ate some {} and drank some milk.", rng.pick(FOODS)),
            6 => format!("{name} felt {}.", rng.pick(FEELINGS)),
            7 => format!(
                "Then {name} found a {} {object} under a tree.",
                rng.pick(ADJ)
            ),
            8 => format!(
                "{name} and {friend} walked to the {} together.",
                rng.pick(PLACES)
            ),
            9 => format!("{name} counted {} {}.", rng.range(2, 12), rng.pick(THINGS)),
            10 => format!(
                "The sky was {} and the wind was {}.",
                rng.pick(ADJ),
                rng.pick(WEATHER)
            ),
            _ => format!("{name} wanted to {} all day.", rng.pick(VERBS)),
        };
        s.push(line);
    }
    s.push(match rng.range(0, 3) {
        0 => format!("At the end of the day, {name} was {feel}."),
        1 => format!("{name} went home and told mom about the {animal}."),
        2 => format!("From that day on, {name} and {friend} were good friends."),
        _ => "The end.".to_string(),
    });
    s.join(" ")
}

/// Generate the corpus of `spec`. Training documents are shuffled (seeded).
pub fn generate(spec: &CorpusSpec) -> Corpus {
    let mut rng = Rng::new(spec.seed);
    let mut c = Corpus::default();
    for _ in 0..spec.arithmetic_docs {
        c.train.push(arithmetic_doc(&mut rng, spec));
    }
    for _ in 0..spec.chat_docs {
        c.train.push(chat_doc(&mut rng, spec));
    }
    let mut english = 0;
    // Bounded: held-out stories are about a tenth of all drawn, so this ends quickly.
    let mut tries = 0usize;
    let max_tries = 20 * (spec.english_docs + spec.heldout_english_docs) + 100;
    while (english < spec.english_docs || c.heldout_english.len() < spec.heldout_english_docs)
        && tries < max_tries
    {
        tries += 1;
        let doc = english_doc(&mut rng);
        if is_held_out_text(&doc) {
            if c.heldout_english.len() < spec.heldout_english_docs {
                c.heldout_english.push(doc);
            }
        } else if english < spec.english_docs {
            c.train.push(doc);
            english += 1;
        }
    }
    // Held-out problems: distinct, in a separate stream (so their number does not change the
    // training corpus), and only the demo's task: + and - of operands up to max_operand.
    let task = CorpusSpec {
        three_digit_fraction: 0.0,
        multiplication_fraction: 0.0,
        ..spec.clone()
    };
    let mut hr = Rng::new(spec.seed ^ 0x0004_E1D0_u64);
    let mut tries = 0usize;
    while c.heldout_arithmetic.len() < spec.heldout_arithmetic
        && tries < 1000 * (spec.heldout_arithmetic + 1)
    {
        tries += 1;
        let p = draw_problem(&mut hr, &task);
        if p.held_out() && !c.heldout_arithmetic.contains(&p) {
            c.heldout_arithmetic.push(p);
        }
    }
    rng.shuffle(&mut c.train);
    c
}

/// Every arithmetic expression `a op b` written in a text (for the held-out check in tests).
pub fn problems_in(text: &str) -> Vec<Problem> {
    let toks: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == '?' || c == ',')
        .filter(|t| !t.is_empty())
        .collect();
    let mut out = Vec::new();
    for w in toks.windows(3) {
        let op = match w[1] {
            "+" | "plus" => '+',
            "-" | "minus" => '-',
            "*" | "times" => '*',
            _ => continue,
        };
        if let (Ok(a), Ok(b)) = (
            w[0].parse::<i64>(),
            w[2].trim_end_matches('.').parse::<i64>(),
        ) {
            out.push(Problem { a, op, b });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> CorpusSpec {
        CorpusSpec {
            arithmetic_docs: 400,
            chat_docs: 200,
            english_docs: 200,
            heldout_english_docs: 30,
            heldout_arithmetic: 50,
            ..CorpusSpec::default()
        }
    }

    #[test]
    fn same_seed_same_corpus_other_seed_other() {
        let a = generate(&small());
        let b = generate(&small());
        assert_eq!(a.train, b.train);
        assert_eq!(a.heldout_english, b.heldout_english);
        let c = generate(&CorpusSpec { seed: 2, ..small() });
        assert_ne!(a.train, c.train);
    }

    #[test]
    fn held_out_problems_and_stories_never_reach_training() {
        let c = generate(&small());
        assert_eq!(c.heldout_arithmetic.len(), 50);
        for p in &c.heldout_arithmetic {
            assert!(matches!(p.op, '+' | '-') && p.a <= 99 && p.b <= 99, "{p:?}");
        }
        assert_eq!(c.heldout_english.len(), 30);
        assert_eq!(c.train.len(), 800);
        let mut seen = 0;
        for doc in &c.train {
            for p in problems_in(doc) {
                seen += 1;
                assert!(
                    !p.held_out(),
                    "held-out problem {p:?} in training doc {doc:?}"
                );
            }
            assert!(!c.heldout_english.contains(doc));
        }
        // The scan really finds problems (or the check above proves nothing).
        assert!(
            seen > 1000,
            "only {seen} problems found in the training text"
        );
        // About one problem in ten is held out.
        let mut rng = Rng::new(9);
        let held = (0..5000)
            .filter(|_| draw_problem(&mut rng, &small()).held_out())
            .count();
        assert!((300..700).contains(&held), "{held} of 5000 held out");
    }

    #[test]
    fn answers_are_right() {
        let c = generate(&small());
        for doc in c.train.iter().filter(|d| !d.contains("has")) {
            for line in doc.lines() {
                if let Some((lhs, rhs)) = line.split_once(" = ") {
                    if let ([p], Ok(r)) = (problems_in(lhs).as_slice(), rhs.trim().parse::<i64>()) {
                        assert_eq!(p.answer(), r, "{line}");
                    }
                }
            }
        }
    }
}
