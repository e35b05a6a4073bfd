//! LR schedules against transformers' `get_scheduler` (fixture written by
//! `fixtures/train/make_optim_fixtures.py`: every kind over 20 steps plus 5 past the end,
//! warmup as steps and as ratios, the lr held by the optimizer at each step), and warmup-ratio
//! resolution against `TrainingArguments.get_warmup_steps`.

use ferrotune_train::schedule::{Schedule, ScheduleError, ScheduleKind, Warmup};

fn fixture() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/train/schedules.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn kind(name: &str) -> ScheduleKind {
    let parsed: ScheduleKind = name.parse().unwrap();
    let de: ScheduleKind =
        serde_json::from_value(serde_json::Value::String(name.to_string())).unwrap();
    assert_eq!(parsed, de);
    assert_eq!(parsed.name(), name);
    parsed
}

/// transformers 5 reads `warmup_steps < 1` as a ratio of the total steps.
fn warmup(v: &serde_json::Value) -> Warmup {
    match v.as_u64() {
        Some(n) => Warmup::Steps(n as usize),
        None => Warmup::Ratio(v.as_f64().unwrap()),
    }
}

#[test]
fn lrs_match_transformers_get_scheduler() {
    let fx = fixture();
    let mut worst = 0.0f64;
    let mut n = 0;
    for s in fx["schedules"].as_array().unwrap() {
        let total = s["total_steps"].as_u64().unwrap() as usize;
        let sched = Schedule::new(
            kind(s["kind"].as_str().unwrap()),
            warmup(&s["warmup"]),
            total,
        )
        .unwrap();
        let want_warmup = s["warmup_steps"].as_u64().unwrap() as usize;
        match sched {
            Schedule::Constant => assert_eq!(want_warmup, 0),
            Schedule::ConstantWithWarmup { warmup_steps }
            | Schedule::Linear { warmup_steps, .. }
            | Schedule::Cosine { warmup_steps, .. } => assert_eq!(warmup_steps, want_warmup, "{s}"),
        }
        let base = s["base_lr"].as_f64().unwrap();
        for (step, want) in s["lrs"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = sched.lr_at(step, base);
            let err = (got - want).abs();
            assert!(
                err <= 1e-9,
                "{} warmup {} step {step}: {got} vs {want}",
                s["kind"],
                s["warmup"]
            );
            worst = worst.max(err / base);
            n += 1;
        }
    }
    assert!(n > 500);
    println!("schedules: {n} lrs, worst |err| / base_lr = {worst:.3e}");
}

#[test]
fn first_step_of_a_warmup_has_lr_zero_and_decay_ends_at_zero() {
    // Invariants of HF's indexing (lr_at(k) = lr used by optimizer step k).
    let lin = Schedule::new(ScheduleKind::Linear, Warmup::Steps(3), 20).unwrap();
    assert_eq!(lin.lr_at(0, 1e-3), 0.0);
    assert_eq!(lin.lr_at(3, 1e-3), 1e-3);
    assert_eq!(lin.lr_at(20, 1e-3), 0.0);
    assert_eq!(lin.lr_at(25, 1e-3), 0.0);
    let cos = Schedule::new(ScheduleKind::Cosine, Warmup::Steps(0), 10).unwrap();
    assert_eq!(cos.lr_at(0, 2.0), 2.0);
    assert!(cos.lr_at(10, 2.0).abs() < 1e-15);
}

#[test]
fn warmup_ratio_resolves_like_training_arguments() {
    let fx = fixture();
    for r in fx["warmup_ratios"].as_array().unwrap() {
        let ratio = r["ratio"].as_f64().unwrap();
        let total = r["total"].as_u64().unwrap() as usize;
        let want = r["warmup_steps"].as_u64().unwrap() as usize;
        assert_eq!(
            Warmup::Ratio(ratio).steps(total).unwrap(),
            want,
            "ratio {ratio} of {total}"
        );
    }
}

#[test]
fn refused_settings_say_why() {
    assert_eq!(
        Schedule::new(ScheduleKind::Constant, Warmup::Steps(5), 100),
        Err(ScheduleError::ConstantWithWarmup(5))
    );
    assert_eq!(Warmup::Ratio(1.5).steps(10), Err(ScheduleError::Ratio(1.5)));
    assert_eq!(
        Warmup::Ratio(-0.1).steps(10),
        Err(ScheduleError::Ratio(-0.1))
    );
    assert_eq!(
        Schedule::new(ScheduleKind::Linear, Warmup::Steps(0), 0),
        Err(ScheduleError::NoSteps { kind: "linear" })
    );
    assert_eq!(
        Schedule::new(ScheduleKind::Cosine, Warmup::Steps(30), 20),
        Err(ScheduleError::WarmupTooLong {
            warmup: 30,
            total: 20
        })
    );
    assert_eq!(
        "cosine_with_restarts".parse::<ScheduleKind>(),
        Err(ScheduleError::UnknownKind("cosine_with_restarts".into()))
    );
    // A constant schedule needs no step count.
    assert_eq!(
        Schedule::new(ScheduleKind::Constant, Warmup::Steps(0), 0),
        Ok(Schedule::Constant)
    );
}
