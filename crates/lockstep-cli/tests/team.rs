//! Decode steps on the spinning team (`LOCKSTEP_TEAM`, `lockstep_engine::team`) change no value:
//! a traced forward pass short enough to run on the team gives bit for bit the tensors it gives
//! on rayon's pool alone, in f32 and bf16, and greedy generation the same tokens; a bad value of
//! the variable is a one-line error.

mod support;

use support::*;

const MODEL: &str = "qwen2-default-bf16";

fn ok(team: &str, args: &[&str]) -> String {
    lockstep_ok_with("LOCKSTEP_TEAM", team, args)
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn the_team_changes_no_value() {
    let m = fixture_folder(MODEL);
    let dir = scratch("team-traces");
    for dtype in ["f32", "bf16"] {
        let out = |team: &str| dir.join(format!("{dtype}-{team}.safetensors"));
        for team in ["on", "off"] {
            let path = out(team);
            let args = [
                "trace",
                "--model",
                &m,
                "--tokens",
                "9,1000,77,5,31000,2,640,11",
            ];
            let rest = ["--dtype", dtype, "--out", path.to_str().unwrap()];
            ok(team, &[&args[..], &rest[..]].concat());
        }
        assert_same_bits(&out("on"), &out("off"), "on the team");
    }
    // Greedy generation: every decode step on the team, the same tokens.
    let gen = |team: &str| -> serde_json::Value {
        let args = "--tokens 9,1000,77 --max-new-tokens 12 --ignore-eos --dtype bf16 --json";
        let out = ok(
            team,
            &[
                &["generate", "--model", &m][..],
                &args.split(' ').collect::<Vec<_>>(),
            ]
            .concat(),
        );
        serde_json::from_str::<serde_json::Value>(out.lines().last().unwrap()).unwrap()
            ["generated_tokens"]
            .clone()
    };
    let tokens = gen("on");
    assert_eq!(tokens.as_array().map(Vec::len), Some(12));
    assert_eq!(tokens, gen("off"));
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn a_bad_value_is_one_line() {
    let m = fixture_folder(MODEL);
    let o = lockstep_with_env(
        &[("LOCKSTEP_TEAM", "sometimes")],
        &["generate", "--model", &m, "--tokens", "1"],
    );
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("LOCKSTEP_TEAM") && err.trim().lines().count() == 1,
        "{err}"
    );
}
