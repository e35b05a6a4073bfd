//! Synthetic problems with exact integer answers, for training and evaluating on verifiable
//! rewards without downloading a dataset: arithmetic (`What is 47 + 815?`) and word problems from
//! a dozen templates. Seeded and deterministic, never repeating within a file, and able to
//! exclude another file's prompts so a held-out set is truly held out. Also writes them as TRL
//! prompt datasets (plain or conversational JSONL) that [`crate::prompt_examples`] reads back,
//! and as preference pairs (chosen = the right answer in the demo's reply format, rejected = a
//! wrong number or the untagged reply) that [`crate::preference_examples`] reads back.
//!
//! Owns: the problem spaces, sampling and the JSONL layout. Does not own: the reward that checks
//! an answer (the `rewards` crate), the CLI flags (the binary parses with [`parse_ops`] and
//! [`parse_digits`]).
//!
//! # Determinism
//!
//! Random numbers come from SplitMix64 (`order.rs`'s fixed algorithm), not
//! from `rand`, whose `StdRng` stream may change between versions: the same spec gives the same
//! file on every machine and every future build. Only integer arithmetic is used.
//!
//! # The space and how it is sampled
//!
//! A problem family is a list of *cells*, each a set of independent slots whose values render to
//! a distinct prompt: for arithmetic a cell is (operator, digits of the left operand, digits of
//! the right operand); for word problems a cell is one template. A draw picks a cell uniformly,
//! then each slot uniformly, so 1-digit and 4-digit operands are equally common (sampling pairs
//! uniformly would make almost every operand 4 digits long). Drawn prompts already produced or
//! excluded are redrawn. The space size (distinct prompts) is exact, so asking for more than it
//! holds is refused up front; when `n` is at least half the space (or redrawing stalls), the
//! whole space is enumerated, shuffled with the seed, and the first `n` kept.

use crate::order::SplitMix64;
use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ferrotune_tokenize::Message;
use serde::Serialize;

/// What can go wrong while generating or writing synthetic data.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error(
        "asked for {n} distinct problems but the space holds only {space} (operators, digit \
         range, templates); widen the digit range, add operators or lower n"
    )]
    SpaceTooSmall { n: usize, space: u128 },
    #[error(
        "asked for {n} distinct problems but only {available} of the {space} in the space are \
         not excluded ({excluded} prompts excluded); widen the space or lower n"
    )]
    TooFewAfterExclusion {
        n: usize,
        available: usize,
        space: u128,
        excluded: usize,
    },
    #[error(
        "found only {found} of {n} distinct problems in {draws} draws from a space of {space}, \
         too large to enumerate; lower n or widen the space"
    )]
    Stalled {
        n: usize,
        found: usize,
        draws: u64,
        space: u128,
    },
    #[error("unknown operator {0:?} in `{1}`: use + - * / (also x × ÷)")]
    UnknownOp(char, String),
    #[error("no operators in `{0}`: give at least one of + - * /")]
    NoOps(String),
    #[error(
        "digit range `{text}`: {reason} (write LOW..HIGH, inclusive, e.g. 1..4, or one number)"
    )]
    Digits { text: String, reason: String },
    #[error("unknown rejected kind `{0}`: use wrong or untagged")]
    UnknownRejected(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type SynthResult<T> = std::result::Result<T, SynthError>;

/// A generated problem: the question and its exact integer answer as a string (`"-12"`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Problem {
    pub prompt: String,
    pub answer: String,
}

/// An arithmetic operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Add,
    Sub,
    Mul,
    /// Exact division only: the dividend is divisor × quotient, the divisor is never 0.
    Div,
}

impl Op {
    /// The symbol written in prompts.
    pub fn symbol(self) -> char {
        match self {
            Op::Add => '+',
            Op::Sub => '-',
            Op::Mul => '*',
            Op::Div => '/',
        }
    }

    fn from_char(c: char) -> Option<Op> {
        match c {
            '+' => Some(Op::Add),
            '-' | '−' => Some(Op::Sub),
            '*' | 'x' | '×' => Some(Op::Mul),
            '/' | '÷' => Some(Op::Div),
            _ => None,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.symbol())
    }
}

/// One operator: a symbol (`+ - * /`, also `x × ÷`) or a name (`add sub mul div`).
impl FromStr for Op {
    type Err = SynthError;
    fn from_str(s: &str) -> SynthResult<Op> {
        let t = s.trim();
        match t {
            "add" => return Ok(Op::Add),
            "sub" => return Ok(Op::Sub),
            "mul" => return Ok(Op::Mul),
            "div" => return Ok(Op::Div),
            _ => {}
        }
        let mut chars = t.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) => Op::from_char(c).ok_or_else(|| SynthError::UnknownOp(c, s.into())),
            _ => Err(SynthError::UnknownOp(
                t.chars().next().unwrap_or(' '),
                s.into(),
            )),
        }
    }
}

/// A set of operators written together, e.g. `"+-*/"` or `"+, -"` (commas and spaces ignored,
/// repeats dropped, order kept).
pub fn parse_ops(s: &str) -> SynthResult<Vec<Op>> {
    let mut ops = Vec::new();
    for c in s.chars().filter(|c| !c.is_whitespace() && *c != ',') {
        let op = Op::from_char(c).ok_or_else(|| SynthError::UnknownOp(c, s.into()))?;
        if !ops.contains(&op) {
            ops.push(op);
        }
    }
    if ops.is_empty() {
        return Err(SynthError::NoOps(s.into()));
    }
    Ok(ops)
}

/// Largest operand length: 9-digit products and sums stay far inside i64.
pub const MAX_DIGITS: u32 = 9;

/// An inclusive digit range: `"1..4"` (also `"1..=4"`) or `"3"` (= `3..3`), within 1..=9.
pub fn parse_digits(s: &str) -> SynthResult<(u32, u32)> {
    let err = |reason: String| SynthError::Digits {
        text: s.into(),
        reason,
    };
    let num = |part: &str| -> SynthResult<u32> {
        part.trim()
            .parse::<u32>()
            .map_err(|_| err(format!("`{}` is not a whole number", part.trim())))
    };
    let (lo, hi) = match s.split_once("..") {
        Some((a, b)) => (num(a)?, num(b.strip_prefix('=').unwrap_or(b))?),
        None => {
            let d = num(s)?;
            (d, d)
        }
    };
    check_digits((lo, hi)).map_err(err)?;
    Ok((lo, hi))
}

fn check_digits((lo, hi): (u32, u32)) -> Result<(), String> {
    if lo == 0 || hi > MAX_DIGITS {
        return Err(format!("digits must be between 1 and {MAX_DIGITS}"));
    }
    if lo > hi {
        return Err(format!("the low end {lo} is above the high end {hi}"));
    }
    Ok(())
}

/// Arithmetic problems `What is A op B?`.
///
/// `digits` bounds the decimal length of both operands of `+ - *` (1-digit numbers include 0)
/// and of the divisor and quotient of `/` (the dividend, their product, may be longer; the
/// divisor is never 0). Results of `-` may be negative.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArithmeticSpec {
    pub n: usize,
    pub seed: u64,
    /// Inclusive operand length range, e.g. (1, 4).
    pub digits: (u32, u32),
    pub ops: Vec<Op>,
}

/// Word problems from [`WORD_TEMPLATES`] (names and objects from small lists).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WordSpec {
    pub n: usize,
    pub seed: u64,
}

/// XORed into the seed per family, so arithmetic and word problems with one seed differ.
const ARITH_SALT: u64 = 0x6172_6974_686d; // "arithm"
const WORD_SALT: u64 = 0x776f_7264; // "word"

/// One family of problems: independent slots per cell, each index tuple → one distinct prompt.
trait Family {
    fn cells(&self) -> usize;
    /// Slot sizes of a cell (all ≥ 1).
    fn sizes(&self, cell: usize) -> Vec<u64>;
    fn render(&self, cell: usize, idx: &[u64]) -> Problem;

    fn space(&self) -> u128 {
        (0..self.cells())
            .map(|c| {
                self.sizes(c)
                    .iter()
                    .map(|&s| u128::from(s))
                    .product::<u128>()
            })
            .sum()
    }
}

/// Enumerating more than this many prompts (to hand out a large share of a space) is refused.
const ENUMERATE_LIMIT: u128 = 20_000_000;

fn generate<F: Family>(
    fam: &F,
    n: usize,
    seed: u64,
    exclude: &HashSet<String>,
) -> SynthResult<Vec<Problem>> {
    let space = fam.space();
    if n as u128 > space {
        return Err(SynthError::SpaceTooSmall { n, space });
    }
    let mut rng = SplitMix64(seed);
    if 2 * (n as u128) < space {
        let mut seen: HashSet<String> = HashSet::with_capacity(n);
        let mut out = Vec::with_capacity(n);
        let budget = 50 * n as u64 + 10_000;
        let mut draws = 0u64;
        while out.len() < n && draws < budget {
            draws += 1;
            let cell = rng.below(fam.cells() as u64) as usize;
            let idx: Vec<u64> = fam.sizes(cell).iter().map(|&s| rng.below(s)).collect();
            let p = fam.render(cell, &idx);
            if exclude.contains(&p.prompt) || seen.contains(&p.prompt) {
                continue;
            }
            seen.insert(p.prompt.clone());
            out.push(p);
        }
        if out.len() == n {
            return Ok(out);
        }
        if space > ENUMERATE_LIMIT {
            return Err(SynthError::Stalled {
                n,
                found: out.len(),
                draws,
                space,
            });
        }
    } else if space > ENUMERATE_LIMIT {
        // 2n ≥ space > 20M: n itself is beyond what fits in a file anyone would train on.
        return Err(SynthError::Stalled {
            n,
            found: 0,
            draws: 0,
            space,
        });
    }
    // Enumerate the whole space, drop excluded prompts, shuffle (Fisher–Yates), keep n.
    let mut all = Vec::new();
    for cell in 0..fam.cells() {
        let sizes = fam.sizes(cell);
        let mut idx = vec![0u64; sizes.len()];
        'cell: loop {
            let p = fam.render(cell, &idx);
            if !exclude.contains(&p.prompt) {
                all.push(p);
            }
            // Mixed-radix increment over the slots.
            for k in (0..idx.len()).rev() {
                idx[k] += 1;
                if idx[k] < sizes[k] {
                    continue 'cell;
                }
                idx[k] = 0;
            }
            break;
        }
    }
    if all.len() < n {
        return Err(SynthError::TooFewAfterExclusion {
            n,
            available: all.len(),
            space,
            excluded: exclude.len(),
        });
    }
    for i in (1..all.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        all.swap(i, j);
    }
    all.truncate(n);
    Ok(all)
}

/// Numbers with exactly `d` decimal digits: 0..=9 for d = 1, else 10^(d-1)..10^d.
fn count_with_digits(d: u32, nonzero: bool) -> u64 {
    match (d, nonzero) {
        (1, false) => 10,
        (1, true) => 9,
        _ => 9 * 10u64.pow(d - 1),
    }
}

fn nth_with_digits(d: u32, nonzero: bool, i: u64) -> i64 {
    let base = match (d, nonzero) {
        (1, false) => 0,
        (1, true) => 1,
        _ => 10u64.pow(d - 1),
    };
    (base + i) as i64
}

struct Arith {
    ops: Vec<Op>,
    lens: Vec<u32>,
}

impl Arith {
    /// (op, digits of the first slot, digits of the second slot).
    fn cell(&self, cell: usize) -> (Op, u32, u32) {
        let l = self.lens.len();
        let op = self.ops[cell / (l * l)];
        (op, self.lens[(cell / l) % l], self.lens[cell % l])
    }
}

impl Family for Arith {
    fn cells(&self) -> usize {
        self.ops.len() * self.lens.len() * self.lens.len()
    }

    fn sizes(&self, cell: usize) -> Vec<u64> {
        let (op, da, db) = self.cell(cell);
        // For `/` the slots are (divisor, quotient); the divisor excludes 0.
        vec![
            count_with_digits(da, op == Op::Div),
            count_with_digits(db, false),
        ]
    }

    fn render(&self, cell: usize, idx: &[u64]) -> Problem {
        let (op, da, db) = self.cell(cell);
        let x = nth_with_digits(da, op == Op::Div, idx[0]);
        let y = nth_with_digits(db, false, idx[1]);
        let (a, b, ans) = match op {
            Op::Add => (x, y, x + y),
            Op::Sub => (x, y, x - y),
            Op::Mul => (x, y, x * y),
            Op::Div => (x * y, x, y), // dividend = divisor × quotient
        };
        Problem {
            prompt: format!("What is {a} {} {b}?", op.symbol()),
            answer: ans.to_string(),
        }
    }
}

fn arith_family(spec: &ArithmeticSpec) -> SynthResult<Arith> {
    check_digits(spec.digits).map_err(|reason| SynthError::Digits {
        text: format!("{}..{}", spec.digits.0, spec.digits.1),
        reason,
    })?;
    let mut ops = Vec::new();
    for op in &spec.ops {
        if !ops.contains(op) {
            ops.push(*op);
        }
    }
    if ops.is_empty() {
        return Err(SynthError::NoOps(String::new()));
    }
    Ok(Arith {
        ops,
        lens: (spec.digits.0..=spec.digits.1).collect(),
    })
}

/// `spec.n` distinct arithmetic problems, deterministic in `spec`.
pub fn arithmetic(spec: &ArithmeticSpec) -> SynthResult<Vec<Problem>> {
    arithmetic_excluding(spec, &HashSet::new())
}

/// Like [`arithmetic`], never producing a prompt in `exclude` (e.g. [`prompt_set`] of the
/// training file, for a held-out evaluation set).
pub fn arithmetic_excluding(
    spec: &ArithmeticSpec,
    exclude: &HashSet<String>,
) -> SynthResult<Vec<Problem>> {
    generate(
        &arith_family(spec)?,
        spec.n,
        spec.seed ^ ARITH_SALT,
        exclude,
    )
}

/// The number of distinct prompts `spec` can produce.
pub fn arithmetic_space(spec: &ArithmeticSpec) -> SynthResult<u128> {
    Ok(arith_family(spec)?.space())
}

/// The prompts of `problems`, for `*_excluding`.
pub fn prompt_set(problems: &[Problem]) -> HashSet<String> {
    problems.iter().map(|p| p.prompt.clone()).collect()
}

// ---- word problems ----

const NAMES: &[&str] = &[
    "Alice", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jamal", "Keiko",
    "Liam",
];
const FRUITS: &[&str] = &["apples", "oranges", "pears", "plums", "peaches", "lemons"];
const THINGS: &[&str] = &[
    "marbles", "stickers", "pencils", "cards", "stamps", "shells",
];

/// A template slot.
enum Slot {
    /// A name from [`NAMES`], different from the template's earlier names.
    Name,
    /// A word from a list (plural nouns).
    Word(&'static [&'static str]),
    /// An integer in an inclusive range.
    Num(i64, i64),
}

/// Slot values in order of kind: names, words, numbers.
struct Vals {
    name: Vec<&'static str>,
    word: Vec<&'static str>,
    num: Vec<i64>,
}

/// A word-problem template: its slots and how they render to (prompt, answer). Rendering must be
/// injective (the numbers and words in the text determine every slot) so that distinct slot
/// values are distinct prompts and the space size is exact.
pub struct WordTemplate {
    pub id: &'static str,
    slots: &'static [Slot],
    render: fn(&Vals) -> (String, i64),
}

use Slot::{Name, Num, Word};

/// The templates, in a fixed order (part of the determinism contract: append, never reorder).
pub static WORD_TEMPLATES: &[WordTemplate] = &[
    WordTemplate {
        id: "fruit_eaten",
        slots: &[Name, Word(FRUITS), Num(1, 20), Num(0, 30)],
        render: |v| {
            let (eaten, left) = (v.num[0], v.num[1]);
            let (a, f) = (v.name[0], v.word[0]);
            (
                format!(
                    "{a} buys {} {f} and eats {eaten} of them. How many {f} does {a} have left?",
                    eaten + left
                ),
                left,
            )
        },
    },
    WordTemplate {
        id: "given_more",
        slots: &[Name, Name, Word(THINGS), Num(1, 60), Num(1, 60)],
        render: |v| {
            let (a, b, t) = (v.name[0], v.name[1], v.word[0]);
            let (x, y) = (v.num[0], v.num[1]);
            (
                format!("{a} has {x} {t}. {b} gives {a} {y} more. How many {t} does {a} have now?"),
                x + y,
            )
        },
    },
    WordTemplate {
        id: "boxes",
        slots: &[Word(THINGS), Num(2, 30), Num(2, 30)],
        render: |v| {
            let (t, boxes, each) = (v.word[0], v.num[0], v.num[1]);
            (
                format!(
                    "There are {boxes} boxes with {each} {t} in each box. How many {t} are there \
                     in total?"
                ),
                boxes * each,
            )
        },
    },
    WordTemplate {
        id: "share",
        slots: &[Name, Word(THINGS), Num(2, 12), Num(1, 25)],
        render: |v| {
            let (a, t, friends, each) = (v.name[0], v.word[0], v.num[0], v.num[1]);
            (
                format!(
                    "{a} shares {} {t} equally among {friends} friends. How many {t} does each \
                     friend get?",
                    friends * each
                ),
                each,
            )
        },
    },
    WordTemplate {
        id: "train",
        slots: &[Num(20, 150), Num(1, 12)],
        render: |v| {
            let (speed, hours) = (v.num[0], v.num[1]);
            (
                format!(
                    "A train travels at {speed} kilometres per hour for {hours} hours. How many \
                     kilometres does it travel?"
                ),
                speed * hours,
            )
        },
    },
    WordTemplate {
        id: "change",
        slots: &[Name, Num(1, 19)],
        render: |v| {
            let (a, cost) = (v.name[0], v.num[0]);
            (
                format!(
                    "{a} pays for a {cost}-dollar book with a 20-dollar note. How many dollars of \
                     change does {a} get?"
                ),
                20 - cost,
            )
        },
    },
    WordTemplate {
        id: "savings",
        slots: &[Name, Num(2, 50), Num(2, 20)],
        render: |v| {
            let (a, per_week, weeks) = (v.name[0], v.num[0], v.num[1]);
            (
                format!(
                    "{a} saves {per_week} dollars every week. How many dollars has {a} saved \
                     after {weeks} weeks?"
                ),
                per_week * weeks,
            )
        },
    },
    WordTemplate {
        id: "pages_left",
        slots: &[Name, Num(1, 200), Num(1, 200)],
        render: |v| {
            let (a, read, left) = (v.name[0], v.num[0], v.num[1]);
            (
                format!(
                    "A book has {} pages. {a} has read {read} pages. How many pages are left to \
                     read?",
                    read + left
                ),
                left,
            )
        },
    },
    WordTemplate {
        id: "temperature",
        slots: &[Num(-10, 30), Num(1, 25)],
        render: |v| {
            let (morning, drop) = (v.num[0], v.num[1]);
            (
                format!(
                    "In the morning the temperature was {morning} degrees. By the evening it had \
                     dropped by {drop} degrees. What was the temperature in the evening?"
                ),
                morning - drop,
            )
        },
    },
    WordTemplate {
        id: "ages",
        slots: &[Name, Name, Num(3, 40), Num(1, 30), Num(1, 20)],
        render: |v| {
            let (a, b) = (v.name[0], v.name[1]);
            let (age, older, years) = (v.num[0], v.num[1], v.num[2]);
            (
                format!(
                    "{a} is {age} years old. {b} is {older} years older than {a}. How old will \
                     {b} be in {years} years?"
                ),
                age + older + years,
            )
        },
    },
    WordTemplate {
        id: "packs",
        slots: &[Name, Word(THINGS), Num(0, 40), Num(2, 9), Num(2, 12)],
        render: |v| {
            let (a, t) = (v.name[0], v.word[0]);
            let (has, packs, per_pack) = (v.num[0], v.num[1], v.num[2]);
            (
                format!(
                    "{a} has {has} {t} and buys {packs} packs with {per_pack} {t} in each pack. \
                     How many {t} does {a} have now?"
                ),
                has + packs * per_pack,
            )
        },
    },
    WordTemplate {
        id: "bus",
        slots: &[Num(1, 30), Num(0, 30), Num(0, 30)],
        render: |v| {
            let (off, stay, on) = (v.num[0], v.num[1], v.num[2]);
            (
                format!(
                    "A bus has {} passengers. At the next stop {off} people get off and {on} \
                     people get on. How many passengers are on the bus now?",
                    off + stay
                ),
                stay + on,
            )
        },
    },
    WordTemplate {
        id: "running",
        slots: &[Name, Num(1, 15), Num(2, 10)],
        render: |v| {
            let (a, km, weeks) = (v.name[0], v.num[0], v.num[1]);
            (
                format!(
                    "{a} runs {km} kilometres every day. How many kilometres does {a} run in \
                     {weeks} weeks?"
                ),
                km * 7 * weeks,
            )
        },
    },
];

struct Words;

impl Family for Words {
    fn cells(&self) -> usize {
        WORD_TEMPLATES.len()
    }

    fn sizes(&self, cell: usize) -> Vec<u64> {
        let mut names = 0u64;
        WORD_TEMPLATES[cell]
            .slots
            .iter()
            .map(|s| match s {
                Name => {
                    names += 1;
                    NAMES.len() as u64 - (names - 1)
                }
                Word(list) => list.len() as u64,
                Num(lo, hi) => (hi - lo + 1) as u64,
            })
            .collect()
    }

    fn render(&self, cell: usize, idx: &[u64]) -> Problem {
        let t = &WORD_TEMPLATES[cell];
        let mut v = Vals {
            name: Vec::new(),
            word: Vec::new(),
            num: Vec::new(),
        };
        for (slot, &i) in t.slots.iter().zip(idx) {
            match slot {
                Name => {
                    // The i-th name not already used by this problem.
                    let name = NAMES
                        .iter()
                        .filter(|n| !v.name.contains(n))
                        .nth(i as usize)
                        .copied()
                        .unwrap_or(NAMES[0]);
                    v.name.push(name);
                }
                Word(list) => v.word.push(list[i as usize]),
                Num(lo, _) => v.num.push(lo + i as i64),
            }
        }
        let (prompt, answer) = (t.render)(&v);
        Problem {
            prompt,
            answer: answer.to_string(),
        }
    }
}

/// `spec.n` distinct word problems, deterministic in `spec`.
pub fn word_problems(spec: &WordSpec) -> SynthResult<Vec<Problem>> {
    word_problems_excluding(spec, &HashSet::new())
}

/// Like [`word_problems`], never producing a prompt in `exclude`.
pub fn word_problems_excluding(
    spec: &WordSpec,
    exclude: &HashSet<String>,
) -> SynthResult<Vec<Problem>> {
    generate(&Words, spec.n, spec.seed ^ WORD_SALT, exclude)
}

/// The number of distinct word problems the templates can produce.
pub fn word_space() -> u128 {
    Words.space()
}

// ---- writing ----

/// How prompts are laid out in the written file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromptFormat {
    /// `{"prompt": "What is 2 + 3?", "answer": "5"}` (TRL's standard prompt-only form).
    Text,
    /// `{"prompt": [{"role": "system", ...}, {"role": "user", "content": "..."}], "answer": ...}`
    /// (TRL's conversational form; the chat template is applied at training time).
    Chat { system: Option<String> },
}

#[derive(Serialize)]
struct TextRow<'a> {
    prompt: &'a str,
    answer: &'a str,
}

#[derive(Serialize)]
struct ChatRow<'a> {
    prompt: Vec<Message>,
    answer: &'a str,
}

/// Writes one JSON object per line (fields `prompt`, `answer`), readable by
/// [`crate::read_rows`] + [`crate::prompt_examples`].
pub fn write_jsonl(problems: &[Problem], path: &Path, format: &PromptFormat) -> SynthResult<()> {
    let io = |source| SynthError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut w = BufWriter::new(File::create(path).map_err(io)?);
    for p in problems {
        let line = match format {
            PromptFormat::Text => serde_json::to_string(&TextRow {
                prompt: &p.prompt,
                answer: &p.answer,
            }),
            PromptFormat::Chat { system } => {
                let mut prompt = Vec::with_capacity(2);
                if let Some(s) = system {
                    prompt.push(Message::new("system", s.as_str()));
                }
                prompt.push(Message::new("user", p.prompt.as_str()));
                serde_json::to_string(&ChatRow {
                    prompt,
                    answer: &p.answer,
                })
            }
        };
        // Serialising strings and integers-as-strings cannot fail; map it anyway, no unwrap.
        let line = line.map_err(|e| io(std::io::Error::other(e)))?;
        writeln!(w, "{line}").map_err(io)?;
    }
    w.flush().map_err(io)
}

/// SFT conversations (`messages` rows): the problem as the user turn (after `system` if given)
/// and the assistant's `<answer>N</answer>`, the format the arithmetic rewards score.
pub fn write_sft_conversations(
    problems: &[Problem],
    path: &Path,
    system: Option<&str>,
) -> SynthResult<()> {
    write_conversations(problems, path, system, |p| {
        Ok(vec![Message::assistant(format!(
            "<answer>{}</answer>",
            p.answer
        ))])
    })
}

/// SFT transcripts that teach a calculator call (`messages` rows): the problem as the user
/// turn, an assistant turn calling `calculator` with the problem's expression in the Hermes
/// format ferrotune's rollout parses, the tool's reply (the answer), and the final
/// `The answer is <answer>N</answer>.`. Problems must read `What is <expression>?` (what the
/// arithmetic generator writes).
pub fn write_tool_transcripts(
    problems: &[Problem],
    path: &Path,
    system: Option<&str>,
) -> SynthResult<()> {
    write_conversations(problems, path, system, |p| {
        let expr = p
            .prompt
            .strip_prefix("What is ")
            .and_then(|r| r.strip_suffix('?'))
            .ok_or_else(|| {
                format!(
                    "tool transcripts need `What is <expression>?` prompts, got {:?}",
                    p.prompt
                )
            })?;
        // Spaced as transformers' `tojson` writes a call (`{"a": 1}`).
        let expr = serde_json::Value::String(expr.to_string());
        let call = format!(
            "<tool_call>\n{{\"name\": \"calculator\", \"arguments\": {{\"expression\": {expr}}}}}\n</tool_call>"
        );
        Ok(vec![
            Message::assistant(call),
            Message::tool("calculator", p.answer.as_str()),
            Message::assistant(format!("The answer is <answer>{}</answer>.", p.answer)),
        ])
    })
}

/// Writes one `{"messages": [...]}` row per problem: `system` if given, the problem as the user
/// turn, then the turns `reply` gives (an error string names why a problem cannot be written).
fn write_conversations(
    problems: &[Problem],
    path: &Path,
    system: Option<&str>,
    reply: impl Fn(&Problem) -> Result<Vec<Message>, String>,
) -> SynthResult<()> {
    let io = |source| SynthError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut w = BufWriter::new(File::create(path).map_err(io)?);
    for p in problems {
        let mut messages: Vec<Message> = system
            .map(|s| Message::new("system", s))
            .into_iter()
            .collect();
        messages.push(Message::user(p.prompt.as_str()));
        messages.extend(reply(p).map_err(|e| io(std::io::Error::other(e)))?);
        let line = serde_json::to_string(&serde_json::json!({ "messages": messages }))
            .map_err(|e| io(std::io::Error::other(e)))?;
        writeln!(w, "{line}").map_err(io)?;
    }
    w.flush().map_err(io)
}

// ---- preference pairs ----

/// What makes the rejected completion of a generated preference pair worse than the chosen one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectedKind {
    /// The right format around a wrong number: the answer off by 1 to 3 either way.
    Wrong,
    /// The right number without the `<answer></answer>` tags.
    Untagged,
}

impl FromStr for RejectedKind {
    type Err = SynthError;
    fn from_str(s: &str) -> SynthResult<Self> {
        match s.trim() {
            "wrong" => Ok(RejectedKind::Wrong),
            "untagged" => Ok(RejectedKind::Untagged),
            other => Err(SynthError::UnknownRejected(other.to_string())),
        }
    }
}

/// A preference pair over one generated problem (TRL's explicit-prompt preference form).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PreferencePair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// XORed into the seed so the wrong-answer offsets do not follow the problems' own draws.
const PREF_SALT: u64 = 0x7072_6566; // "pref"

/// The reply the demo teaches (`ferrotune demo`'s SFT stage): `The answer is <answer>N</answer>.`
pub fn tagged_reply(answer: &str) -> String {
    format!("The answer is <answer>{answer}</answer>.")
}

/// One pair per problem: chosen = [`tagged_reply`] of the right answer; rejected by `kind`.
/// Deterministic in (`problems`, `kind`, `seed`). Answers that are not integers (never produced
/// by the generators here) get a `Wrong` rejection with `?` appended, still different.
pub fn preference_pairs(
    problems: &[Problem],
    kind: RejectedKind,
    seed: u64,
) -> Vec<PreferencePair> {
    let mut rng = SplitMix64(seed ^ PREF_SALT);
    problems
        .iter()
        .map(|p| {
            let rejected = match kind {
                RejectedKind::Untagged => format!("The answer is {}.", p.answer),
                RejectedKind::Wrong => {
                    let off = 1 + rng.below(3) as i64;
                    let off = if rng.below(2) == 0 { off } else { -off };
                    let wrong = match p.answer.parse::<i64>() {
                        Ok(a) => (a + off).to_string(),
                        Err(_) => format!("{}?", p.answer),
                    };
                    tagged_reply(&wrong)
                }
            };
            PreferencePair {
                prompt: p.prompt.clone(),
                chosen: tagged_reply(&p.answer),
                rejected,
            }
        })
        .collect()
}

#[derive(Serialize)]
struct ChatPrefRow {
    prompt: Vec<Message>,
    chosen: Vec<Message>,
    rejected: Vec<Message>,
}

/// Writes pairs as JSONL: plain text (`prompt`, `chosen`, `rejected` strings, the replies with
/// a leading space) or TRL's
/// conversational form (`prompt` a message list, `chosen`/`rejected` one assistant message
/// each), readable by [`crate::read_rows`] + [`crate::preference_examples`].
pub fn write_preference_jsonl(
    pairs: &[PreferencePair],
    path: &Path,
    format: &PromptFormat,
) -> SynthResult<()> {
    let io = |source| SynthError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut w = BufWriter::new(File::create(path).map_err(io)?);
    for p in pairs {
        let line = match format {
            // Plain text is scored as prompt ++ completion, so the completion brings its own
            // separating space (TRL's example rows: "The sky is" / " blue.").
            PromptFormat::Text => serde_json::to_string(&PreferencePair {
                prompt: p.prompt.clone(),
                chosen: format!(" {}", p.chosen),
                rejected: format!(" {}", p.rejected),
            }),
            PromptFormat::Chat { system } => {
                let mut prompt = Vec::with_capacity(2);
                if let Some(s) = system {
                    prompt.push(Message::new("system", s.as_str()));
                }
                prompt.push(Message::new("user", p.prompt.as_str()));
                serde_json::to_string(&ChatPrefRow {
                    prompt,
                    chosen: vec![Message::new("assistant", p.chosen.as_str())],
                    rejected: vec![Message::new("assistant", p.rejected.as_str())],
                })
            }
        };
        let line = line.map_err(|e| io(std::io::Error::other(e)))?;
        writeln!(w, "{line}").map_err(io)?;
    }
    w.flush().map_err(io)
}
