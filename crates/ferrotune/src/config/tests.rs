//! The config's unit tests: every key explained, defaults, and each rule naming its key.
use super::*;

fn minimal() -> toml::Table {
    toml::from_str(
        "[model]\npath = \"m\"\n[lora]\n[data]\ntrain = \"t.jsonl\"\n[run]\noutput_dir = \"o\"\n[sft]\n",
    )
    .unwrap()
}

fn leaf_keys(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
    for (k, v) in t {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(sub) => {
                out.push(key.clone());
                leaf_keys(&key, sub, out)
            }
            _ => out.push(key),
        }
    }
}

/// Every key the config accepts is explained, and every explained key is accepted.
#[test]
fn explain_table_matches_the_structs() {
    let cfg = RunConfig::deserialize(minimal()).unwrap();
    let full: toml::Table = toml::from_str(&cfg.to_toml()).unwrap();
    let mut keys = Vec::new();
    leaf_keys("", &full, &mut keys);
    let explained: Vec<&str> = KEYS.iter().map(|(k, _, _)| *k).collect();
    for k in &keys {
        let optional_leaf = k == "data.eval"; // None is not serialised
        assert!(
            explained.contains(&k.as_str()) || optional_leaf,
            "key {k} is not in KEYS"
        );
    }
    for k in explained {
        if [
            "model", "lora", "data", "optim", "run", "sft", "grpo", "dpo", "eval",
        ]
        .contains(&k)
            || k == "data.eval"
            || k == "model.chat_template"
            || k.starts_with("grpo.")
            || k.starts_with("dpo.")
            || k == "ppo"
            || k.starts_with("ppo.")
            || k == "distill"
            || k.starts_with("distill.")
            || k == "reward_model"
            || k.starts_with("reward_model.")
            || k.starts_with("eval.")
        {
            continue;
        }
        assert!(
            keys.iter().any(|x| x == k),
            "KEYS lists {k}, which the structs do not have"
        );
    }
}

/// The `[ppo]` keys and `KEYS` agree both ways; a PPO config validates with TRL's
/// defaults; the cross-field rules name their key.
#[test]
fn ppo_keys_are_explained_and_checked() {
    let t: toml::Table = toml::from_str(
        "[model]\npath = \"m\"\n[lora]\n[data]\ntrain = \"t.jsonl\"\n[run]\noutput_dir = \"o\"\n[ppo]\nreward_model_path = \"rm\"\nmissing_eos_penalty = 1.0\n",
    )
    .unwrap();
    let cfg = RunConfig::deserialize(t).unwrap();
    cfg.validate(Path::new("c.toml")).unwrap();
    let p = cfg.ppo.as_ref().unwrap();
    let loss = p.loss_config();
    assert_eq!(loss, ferrotune_train::ppo_loss::PpoConfig::default());
    assert_eq!(
        (
            p.num_ppo_epochs,
            p.num_mini_batches,
            p.max_completion_len,
            p.temperature
        ),
        (4, 1, 53, 0.7)
    );
    let full: toml::Table = toml::from_str(&cfg.to_toml()).unwrap();
    let mut keys = Vec::new();
    leaf_keys("", &full, &mut keys);
    let ppo_keys: Vec<&String> = keys.iter().filter(|k| k.starts_with("ppo.")).collect();
    let explained: Vec<&str> = KEYS
        .iter()
        .map(|(k, _, _)| *k)
        .filter(|k| k.starts_with("ppo."))
        .collect();
    for k in &ppo_keys {
        assert!(explained.contains(&k.as_str()), "key {k} is not in KEYS");
    }
    for k in explained {
        assert!(
            ppo_keys.iter().any(|x| *x == k),
            "KEYS lists {k}, which [ppo] does not have"
        );
    }
    let check = |f: &dyn Fn(&mut RunConfig), field: &str, words: &str| {
        let mut c = cfg.clone();
        f(&mut c);
        let e = c.validate(Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains(field) && e.contains(words), "{e}");
    };
    check(&|c| c.lora = None, "ppo", "[lora]");
    check(
        &|c| c.ppo.as_mut().unwrap().reward_model_path = None,
        "ppo.rewards",
        "needs a reward",
    );
    refused_at_load(&cfg, "ppo.kl_estimator=k2", "ppo.kl_estimator", "k2");
    check(&|c| c.ppo.as_mut().unwrap().lam = 1.5, "ppo", "lam");
    check(
        &|c| c.ppo.as_mut().unwrap().temperature = 0.0,
        "ppo.temperature",
        "positive",
    );
    check(
        &|c| {
            c.run.batch_size = 1;
        },
        "run.batch_size",
        "whitened",
    );
    check(&|c| c.sft = Some(SftSection {}), "ppo", "[sft] and [ppo]");
}

/// The `[grpo]` keys and `KEYS` agree both ways, and a GRPO config validates.
#[test]
fn grpo_keys_are_explained() {
    let t: toml::Table = toml::from_str(
        "[model]\npath = \"m\"\n[lora]\n[data]\ntrain = \"t.jsonl\"\n[run]\noutput_dir = \"o\"\nbatch_size = 8\n[grpo]\nepsilon_high = 0.28\ndelta = 1.5\nmax_tool_calling_iterations = 2\ntools = [{ name = \"calculator\" }]\nrewards = [{ name = \"answer_match\" }]\n",
    )
    .unwrap();
    let cfg = RunConfig::deserialize(t).unwrap();
    cfg.validate(Path::new("c.toml")).unwrap();
    let full: toml::Table = toml::from_str(&cfg.to_toml()).unwrap();
    let mut keys = Vec::new();
    leaf_keys("", &full, &mut keys);
    let grpo_keys: Vec<&String> = keys.iter().filter(|k| k.starts_with("grpo.")).collect();
    let explained: Vec<&str> = KEYS
        .iter()
        .map(|(k, _, _)| *k)
        .filter(|k| k.starts_with("grpo."))
        .collect();
    for k in &grpo_keys {
        assert!(explained.contains(&k.as_str()), "key {k} is not in KEYS");
    }
    for k in explained {
        assert!(
            grpo_keys.iter().any(|x| *x == k),
            "KEYS lists {k}, which [grpo] does not have"
        );
    }
    // batch 8 with G = 3 cannot form whole groups.
    let mut bad = cfg.clone();
    bad.grpo.as_mut().unwrap().num_generations = 3;
    let e = bad.validate(Path::new("c.toml")).unwrap_err().to_string();
    assert!(
        e.contains("grpo.num_generations") && e.contains("divisible"),
        "{e}"
    );
}

/// The `[dpo]` keys and `KEYS` agree both ways; a DPO config validates; the cross-field
/// rules name their key.
#[test]
fn dpo_keys_are_explained_and_checked() {
    let t: toml::Table = toml::from_str(
        "[model]\npath = \"m\"\n[lora]\n[data]\ntrain = \"t.jsonl\"\n[run]\noutput_dir = \"o\"\n[dpo]\n",
    )
    .unwrap();
    let cfg = RunConfig::deserialize(t).unwrap();
    cfg.validate(Path::new("c.toml")).unwrap();
    let d = cfg.dpo.as_ref().unwrap();
    assert_eq!(
        (d.beta, d.loss_type.as_str(), d.max_length),
        (0.1, "sigmoid", 1024)
    );
    let full: toml::Table = toml::from_str(&cfg.to_toml()).unwrap();
    let mut keys = Vec::new();
    leaf_keys("", &full, &mut keys);
    let dpo_keys: Vec<&String> = keys.iter().filter(|k| k.starts_with("dpo.")).collect();
    let explained: Vec<(&str, &str)> = KEYS
        .iter()
        .map(|(k, d, _)| (*k, *d))
        .filter(|(k, _)| k.starts_with("dpo."))
        .collect();
    for k in &dpo_keys {
        assert!(
            explained.iter().any(|(e, _)| e == k),
            "key {k} is not in KEYS"
        );
    }
    // An unset optional key (default "none") is not written to TOML.
    for (k, default) in explained {
        assert!(
            default == "none" || dpo_keys.iter().any(|x| *x == k),
            "KEYS lists {k}, which [dpo] does not have"
        );
    }
    let check = |f: &dyn Fn(&mut RunConfig), field: &str, words: &str| {
        let mut c = cfg.clone();
        f(&mut c);
        let e = c.validate(Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains(field) && e.contains(words), "{e}");
    };
    check(&|c| c.lora = None, "dpo", "[lora]");
    refused_at_load(&cfg, "dpo.loss_type=robust", "dpo.loss_type", "robust");
    check(
        &|c| c.dpo.as_mut().unwrap().beta = 0.0,
        "dpo.beta",
        "positive",
    );
    check(
        &|c| {
            let d = c.dpo.as_mut().unwrap();
            d.loss_type = ferrotune_train::pref_loss::DpoLossType::Ipo;
            d.label_smoothing = 0.1;
        },
        "dpo.label_smoothing",
        "ipo",
    );
    check(&|c| c.sft = Some(SftSection {}), "dpo", "[sft] and [dpo]");
    refused_at_load(
        &cfg,
        "dpo.truncation_mode=keep_end",
        "dpo.truncation_mode",
        "keep_start",
    );
}

/// The `[reward_model]` keys and `KEYS` agree both ways; a reward-model config validates
/// with TRL's defaults; the cross-field rules name their key.
#[test]
fn reward_model_keys_are_explained_and_checked() {
    let t: toml::Table = toml::from_str(
        "[model]\npath = \"m\"\n[lora]\n[data]\ntrain = \"t.jsonl\"\n[run]\noutput_dir = \"o\"\n[reward_model]\ncenter_rewards_coefficient = 0.01\n",
    )
    .unwrap();
    let cfg = RunConfig::deserialize(t).unwrap();
    cfg.validate(Path::new("c.toml")).unwrap();
    let r = cfg.reward_model.as_ref().unwrap();
    assert_eq!(
        (r.max_length, r.center_rewards_coefficient),
        (1024, Some(0.01))
    );
    let full: toml::Table = toml::from_str(&cfg.to_toml()).unwrap();
    let mut keys = Vec::new();
    leaf_keys("", &full, &mut keys);
    let rm_keys: Vec<&String> = keys
        .iter()
        .filter(|k| k.starts_with("reward_model."))
        .collect();
    let explained: Vec<&str> = KEYS
        .iter()
        .map(|(k, _, _)| *k)
        .filter(|k| k.starts_with("reward_model."))
        .collect();
    for k in &rm_keys {
        assert!(explained.contains(&k.as_str()), "key {k} is not in KEYS");
    }
    for k in explained {
        assert!(
            rm_keys.iter().any(|x| *x == k),
            "KEYS lists {k}, which [reward_model] does not have"
        );
    }
    assert!(KEYS.iter().any(|(k, _, _)| *k == "reward_model"));
    let check = |f: &dyn Fn(&mut RunConfig), field: &str, words: &str| {
        let mut c = cfg.clone();
        f(&mut c);
        let e = c.validate(Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains(field) && e.contains(words), "{e}");
    };
    check(&|c| c.lora = None, "reward_model", "[lora]");
    check(
        &|c| c.reward_model.as_mut().unwrap().center_rewards_coefficient = Some(-1.0),
        "reward_model.center_rewards_coefficient",
        ">= 0",
    );
    check(
        &|c| c.reward_model.as_mut().unwrap().max_length = 1,
        "reward_model.max_length",
        "at least 2",
    );
    check(
        &|c| c.dpo = Some(toml::from_str("").unwrap()),
        "reward_model",
        "[dpo] and [reward_model]",
    );
}

/// A `model` reward's path is relative to the config file, like every other path.
#[test]
fn model_reward_paths_resolve_against_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sub/c.toml");
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    std::fs::write(
        &cfg,
        "[model]\npath = \"m\"\n[lora]\n[data]\ntrain = \"t.jsonl\"\n[run]\noutput_dir = \"o\"\nbatch_size = 8\n[grpo]\nrewards = [{ name = \"model\", path = \"../runs/rm\" }, { name = \"format_tags\" }]\n",
    )
    .unwrap();
    let c = RunConfig::load(&cfg, &[]).unwrap();
    let g = c.grpo.unwrap();
    let want = std::path::absolute(dir.path().join("runs/rm")).unwrap();
    assert_eq!(
        g.rewards[0].get("path").and_then(|v| v.as_str()),
        Some(want.to_str().unwrap())
    );
    assert!(g.rewards[1].get("path").is_none());
}

/// `model.chat_template` resolves against the config file and is kept in the resolved config.
#[test]
fn chat_template_path_resolves_against_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sub/c.toml");
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    std::fs::write(
        &cfg,
        "[model]\npath = \"m.gguf\"\nchat_template = \"../templates/g.jinja\"\n[lora]\n[data]\ntrain = \"t.jsonl\"\n[run]\noutput_dir = \"o\"\n[sft]\n",
    )
    .unwrap();
    let c = RunConfig::load(&cfg, &[]).unwrap();
    let want = std::path::absolute(dir.path().join("templates/g.jinja")).unwrap();
    assert_eq!(c.model.chat_template.as_deref(), Some(want.as_path()));
    assert!(c.to_toml().contains("chat_template"));
}

/// The `[distill]` keys and `KEYS` agree both ways; TRL's GKD defaults; the cross-field
/// rules name their key; the teacher paths resolve against the config file.
#[test]
fn distill_keys_are_explained_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sub/c.toml");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(
        &file,
        "[model]\npath = \"m\"\n[data]\ntrain = \"t.jsonl\"\n[run]\noutput_dir = \"o\"\n[distill]\nteacher = \"../teacher\"\n",
    )
    .unwrap();
    let cfg = RunConfig::load(&file, &[]).unwrap();
    let d = cfg.distill.as_ref().unwrap();
    assert_eq!(
        (d.lmbda, d.beta, d.temperature, d.max_new_tokens, d.seq_kd),
        (0.5, 0.5, 0.9, 128, false)
    );
    assert_eq!(
        d.teacher,
        std::path::absolute(dir.path().join("teacher")).unwrap()
    );
    let full: toml::Table = toml::from_str(&cfg.to_toml()).unwrap();
    let mut keys = Vec::new();
    leaf_keys("", &full, &mut keys);
    let ours: Vec<&String> = keys.iter().filter(|k| k.starts_with("distill.")).collect();
    let explained: Vec<&str> = KEYS
        .iter()
        .map(|(k, _, _)| *k)
        .filter(|k| k.starts_with("distill."))
        .collect();
    for k in &ours {
        assert!(explained.contains(&k.as_str()), "key {k} is not in KEYS");
    }
    for k in explained {
        let optional_leaf = k == "distill.teacher_cache"; // None is not serialised
        assert!(
            optional_leaf || ours.iter().any(|x| *x == k),
            "KEYS lists {k}, which [distill] does not have"
        );
    }
    let check = |f: &dyn Fn(&mut DistillSection), field: &str, words: &str| {
        let mut c = cfg.clone();
        f(c.distill.as_mut().unwrap());
        let e = c.validate(Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains(field) && e.contains(words), "{e}");
    };
    check(&|d| d.lmbda = 1.5, "distill.lmbda", "[0, 1]");
    check(&|d| d.beta = -0.1, "distill.beta", "[0, 1]");
    check(&|d| d.temperature = 0.0, "distill.temperature", "positive");
    check(
        &|d| d.teacher_cache = Some("c.safetensors".into()),
        "distill.top_k",
        "top-k",
    );
    check(
        &|d| {
            d.teacher_cache = Some("c.safetensors".into());
            d.top_k = 8;
        },
        "distill.teacher_cache",
        "lmbda = 0",
    );
    let mut c = cfg.clone();
    c.sft = Some(SftSection {});
    let e = c.validate(Path::new("c.toml")).unwrap_err().to_string();
    assert!(e.contains("[sft] and [distill]"), "{e}");
}

#[test]
fn unknown_keys_and_bad_sets_are_refused() {
    let mut t = minimal();
    apply_set(&mut t, "run.max_stepz=3").unwrap();
    let e = RunConfig::deserialize(t).unwrap_err().to_string();
    assert!(e.contains("max_stepz"), "{e}");
    let mut t = minimal();
    assert!(apply_set(&mut t, "novalue").is_err());
    apply_set(&mut t, "run.max_steps=7").unwrap();
    apply_set(&mut t, "model.path=some/dir").unwrap();
    let cfg = RunConfig::deserialize(t).unwrap();
    assert_eq!(cfg.run.max_steps, 7);
    assert_eq!(cfg.model.path, PathBuf::from("some/dir"));
}

/// Every default `--explain` shows is the schema's own: each section is deserialised from
/// nothing but its required keys, serialised back, and each key's value compared with the
/// default column of `KEYS` (entries that are not a TOML value — "(required)", "none",
/// "epsilon" — are words for the user and skipped).
#[test]
fn explained_defaults_are_the_schemas() {
    let text = "[model]\npath = \"m\"\n[lora]\n[data]\ntrain = \"t.jsonl\"\n[optim]\n[run]\noutput_dir = \"o\"\n[eval]\n[grpo]\n[dpo]\n[reward_model]\n[ppo]\n[distill]\nteacher = \"t\"\n";
    let raw: toml::Table = toml::from_str(text).unwrap();
    let section = |name: &str| -> toml::Table {
        let t = raw[name].as_table().unwrap().clone();
        let v: toml::Value = match name {
            "model" => toml::Value::try_from(ModelSection::deserialize(t).unwrap()),
            "lora" => toml::Value::try_from(LoraSection::deserialize(t).unwrap()),
            "data" => toml::Value::try_from(DataSection::deserialize(t).unwrap()),
            "optim" => toml::Value::try_from(OptimSection::deserialize(t).unwrap()),
            "run" => toml::Value::try_from(RunSection::deserialize(t).unwrap()),
            "eval" => toml::Value::try_from(EvalSection::deserialize(t).unwrap()),
            "grpo" => toml::Value::try_from(GrpoSection::deserialize(t).unwrap()),
            "dpo" => toml::Value::try_from(DpoSection::deserialize(t).unwrap()),
            "reward_model" => toml::Value::try_from(RewardModelSection::deserialize(t).unwrap()),
            "ppo" => toml::Value::try_from(PpoSection::deserialize(t).unwrap()),
            "distill" => toml::Value::try_from(DistillSection::deserialize(t).unwrap()),
            other => panic!("no section {other}"),
        }
        .unwrap();
        v.as_table().unwrap().clone()
    };
    let same = |a: &toml::Value, b: &toml::Value| match (a, b) {
        (toml::Value::Integer(x), toml::Value::Float(y))
        | (toml::Value::Float(y), toml::Value::Integer(x)) => (*x as f64 - y).abs() < 1e-12,
        (toml::Value::Float(x), toml::Value::Float(y)) => (x - y).abs() <= 1e-12 * x.abs().max(1.0),
        _ => a == b,
    };
    let mut checked = 0;
    for (key, default, _) in KEYS {
        let Some((sec, leaf)) = key.split_once('.') else {
            continue;
        };
        let Ok(t) = toml::from_str::<toml::Table>(&format!("v = {default}")) else {
            continue;
        };
        let want = &t["v"];
        let got = section(sec);
        let got = got.get(leaf).unwrap_or_else(|| {
            panic!("{key}: explained with default {default}, but the schema serialises no value")
        });
        assert!(
            same(got, want),
            "{key}: --explain says {default}, the schema's default is {got}"
        );
        checked += 1;
    }
    assert!(checked > 60, "only {checked} defaults compared");
}

/// Loading `cfg` (as its TOML) with the override `set` is refused, naming `field` and saying
/// `words`: the path a user's file takes for keys whose value is one of a set of names.
fn refused_at_load(cfg: &RunConfig, set: &str, field: &str, words: &str) {
    let mut t: toml::Table = toml::from_str(&cfg.to_toml()).unwrap();
    apply_set(&mut t, set).unwrap();
    let e = RunConfig::from_table(t, Path::new("c.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains(field) && e.contains(words), "{e}");
}
