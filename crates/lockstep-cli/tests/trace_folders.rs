//! Trace folders (one part file per layer): the reference writes them (whole-model and streamed)
//! with the values of the single-file trace, and `lockstep compare` judges them exactly as it
//! judges the single file.

mod support;

use std::path::Path;
use support::*;

/// `lockstep compare` with a JSON report; the exit code and the report.
fn compare_json(reference: &Path, test: &Path, oracle: &Path, out: &Path) -> (i32, String) {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let o = lockstep(&[
        "compare",
        &s(reference),
        &s(test),
        "--oracle",
        &s(oracle),
        "--json",
        &s(out),
    ]);
    let code = o.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 1,
        "compare failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    (code, std::fs::read_to_string(out).unwrap())
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn trace_folders_compare_exactly_as_trace_files() {
    let py = reference_python();
    let model = fixtures().join("models").join("qwen2-gqa");
    let dir = scratch("trace_folders");
    let m = model.to_str().unwrap();
    let ids = ids_arg(&token_ids(12, 2048, 3));
    let path = |n: &str| dir.join(n).to_str().unwrap().to_string();
    // The f32 reference as a file and as a folder (through `lockstep reference`), the f64 oracle
    // streamed layer by layer into a folder and into a file, and lockstep's own f32 trace.
    let folder = format!("{}/", path("ref-f32"));
    for out in [path("ref-f32.safetensors"), folder.clone()] {
        lockstep_ok(&[
            "reference",
            "--model",
            m,
            "--tokens",
            &ids,
            "--dtype",
            "f32",
            "--out",
            &out,
        ]);
    }
    let oracle_folder = format!("{}/", path("oracle"));
    for out in [path("oracle.safetensors"), oracle_folder.clone()] {
        reference(
            &py,
            &[
                "trace",
                "--model",
                m,
                "--tokens",
                &ids,
                "--dtype",
                "f64",
                "--streamed",
                "--out",
                &out,
            ],
        );
    }
    trace_to(&model, &ids, "f32", &dir.join("ours.safetensors"));

    // One part per layer, plus the parts before and after the layers.
    let layers = 2;
    for f in [&folder, &oracle_folder] {
        let parts = std::fs::read_dir(f).unwrap().count();
        assert_eq!(parts, layers + 2, "{f}");
    }
    // Every tensor of the folder equals the file's.
    let file = lockstep_trace::Trace::read(&dir.join("ref-f32.safetensors")).unwrap();
    let store = lockstep_trace::TraceStore::open(Path::new(&folder)).unwrap();
    assert_eq!(store.names(), file.names());
    let all = store.load(&file.names()).unwrap();
    for n in file.names() {
        assert_eq!(all.get(n), file.get(n), "{n}");
    }

    let ours = dir.join("ours.safetensors");
    let (c1, whole) = compare_json(
        &dir.join("ref-f32.safetensors"),
        &ours,
        &dir.join("oracle.safetensors"),
        &dir.join("a.json"),
    );
    let (c2, parts) = compare_json(
        Path::new(&folder),
        &ours,
        Path::new(&oracle_folder),
        &dir.join("b.json"),
    );
    assert_eq!(c1, 0, "{whole}");
    assert_eq!((c2, &parts), (c1, &whole));

    // A changed value in one part is found there, named as in the file.
    let mut bad = lockstep_trace::Trace::read(&ours).unwrap();
    let t = bad.get_mut("layers.1.mlp_out").unwrap();
    if let lockstep_trace::TensorData::F32(v) = &mut t.data {
        v[7] += 1.0;
    }
    // Same file name for both forms: the report names the test trace by it.
    std::fs::create_dir_all(dir.join("file")).unwrap();
    bad.write(&dir.join("file/bad.safetensors")).unwrap();
    lockstep_trace::write_parts(&bad, &dir.join("folder/bad.safetensors")).unwrap();
    let (c3, whole) = compare_json(
        &dir.join("ref-f32.safetensors"),
        &dir.join("file/bad.safetensors"),
        &dir.join("oracle.safetensors"),
        &dir.join("c.json"),
    );
    let (c4, parts) = compare_json(
        Path::new(&folder),
        &dir.join("folder/bad.safetensors"),
        Path::new(&oracle_folder),
        &dir.join("d.json"),
    );
    assert_eq!(c3, 1);
    assert!(
        whole.contains("\"first_divergence\": \"layers.1.mlp_out\""),
        "{whole}"
    );
    assert_eq!((c4, &parts), (c3, &whole));
}
