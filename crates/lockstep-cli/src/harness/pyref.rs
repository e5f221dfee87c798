//! The Python reference as the verifier's [`Reference`]: one Python process serving every batch
//! of work ([`ReferenceServer`]), with results cached so repeated runs (e.g. `selftest`) do not
//! recompute them.

use super::protocol::{ChatAnswer, GenerateAnswer, GenerateRequest, OpsRequest, TraceRequest};
use super::python::{ReferenceEnv, ReferenceServer};
use super::reference::{GenerateJob, OpsJob, Reference, ReferenceWeights, TraceJob};
use super::{HarnessError, HarnessResult};
use lockstep_verify::near_tie::GeneratedRow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// [`Reference`] backed by `python -m lockstep_reference`.
pub struct PythonReference {
    env: ReferenceEnv,
    scratch: PathBuf,
    tokenized: HashMap<(PathBuf, Vec<String>), Vec<Vec<u32>>>,
    weights: HashMap<PathBuf, ReferenceWeights>,
    generated: HashMap<String, Vec<GeneratedRow>>,
    /// The reference process, started at the first command and kept for the next ones.
    server: Option<ReferenceServer>,
    /// [`code_stamp`] of the reference's code, part of every cached trace's key.
    code: String,
}

impl PythonReference {
    /// A reference runner writing its request files under `scratch`.
    pub fn new(env: ReferenceEnv, scratch: &Path) -> Self {
        PythonReference {
            scratch: scratch.to_path_buf(),
            tokenized: HashMap::new(),
            weights: HashMap::new(),
            generated: HashMap::new(),
            server: None,
            code: code_stamp(&env),
            env,
        }
    }

    fn write_request(&self, name: &str, v: &impl serde::Serialize) -> HarnessResult<PathBuf> {
        super::create_work_dir(&self.scratch)?;
        // One file per process: two lockstep runs on one model share the scratch folder.
        let p = self.scratch.join(format!("{}-{name}", std::process::id()));
        let text = serde_json::to_string(v).map_err(|e| HarnessError::reference(e.to_string()))?;
        std::fs::write(&p, text)
            .map_err(|e| HarnessError::io(format!("cannot write {}", p.display()), e))?;
        Ok(p)
    }

    /// Runs the reference command `args` in the server, started here at the first command (and
    /// again after one that killed it); its stdout.
    fn run(&mut self, args: &[&str]) -> HarnessResult<String> {
        let server = match &mut self.server {
            Some(s) => s,
            None => self.server.insert(self.env.serve()?),
        };
        let out = server.run(args);
        if out.is_err() && !server.is_alive() {
            self.server = None;
        }
        out
    }

    fn last_json_line(stdout: &str) -> HarnessResult<serde_json::Value> {
        let line = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .ok_or_else(|| HarnessError::reference("it printed nothing"))?;
        serde_json::from_str(line)
            .map_err(|e| HarnessError::reference(format!("unexpected output ({e}): {line}")))
    }
}

/// Whether the reference runs the model layer by layer (one decoder layer's weights in memory;
/// bit-identical to the whole-model run but for the last bits of f64 logits whose head is read in
/// row chunks): the pure-f64 oracle when a float64 copy of the model
/// would take more than 6 GB (a 7B model is 61 GB in f64), and any dtype when the model in it
/// would take more than half the memory available now (a 14B model is 29.5 GB in bf16).
/// `LOCKSTEP_REFERENCE_STREAMED=always` streams every model (a machine whose memory is spoken
/// for, and the tests of the streamed path on small models).
pub fn streamed(model: &Path, dtype: &str) -> bool {
    if std::env::var("LOCKSTEP_REFERENCE_STREAMED").is_ok_and(|v| v == "always") {
        return true;
    }
    let Ok(c) = lockstep_engine::ModelConfig::from_file(&model.join("config.json")) else {
        return false;
    };
    let bytes_per_param = match dtype {
        "f64" => 8,
        "f32" => 4,
        _ => 2,
    };
    let bytes = c.parameter_count() as u64 * bytes_per_param;
    let half_available = lockstep_engine::resources::available_memory().unwrap_or(u64::MAX) / 2;
    (dtype == "f64" && bytes > 6_000_000_000) || bytes > half_available
}

/// Whether the reference's weights check reads the checkpoint tensor by tensor instead of loading
/// the model (`weights --streamed`): by the rule of [`streamed`] for the dtype the check loads in,
/// the stored one, when the stored tensors (the safetensors files) take more than half the memory
/// available now. A 14B bf16 model loaded whole maps 29.5 GB, ~20 GB of it resident here.
fn weights_streamed(model: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(model) else {
        return false;
    };
    let stored: u64 = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    stored > lockstep_engine::resources::available_memory().unwrap_or(u64::MAX) / 2
}

/// The reference's answer to `command` is not what the protocol says.
fn bad_output(command: &str, e: serde_json::Error) -> HarnessError {
    HarnessError::reference(format!("unexpected {command} output: {e}"))
}

/// The rows of one `generate-batch` result: `generated` ids and, per step, the reference's best
/// tokens (`top_ids`, `top_logits`: null for a non-finite score). With one prompt each field
/// holds that row, not a list of rows; the reference's `prompt_ids` must be `prompts`.
fn generated_rows(r: &GenerateAnswer, prompts: &[Vec<u32>]) -> HarnessResult<Vec<GeneratedRow>> {
    let single = prompts.len() == 1;
    let bad = |e: serde_json::Error| bad_output("generate-batch", e);
    let rows = |v: &serde_json::Value| -> serde_json::Value {
        if single {
            serde_json::Value::Array(vec![v.clone()])
        } else {
            v.clone()
        }
    };
    let prompt_ids: Vec<Vec<u32>> = serde_json::from_value(rows(&r.prompt_ids)).map_err(bad)?;
    if prompt_ids != prompts {
        return Err(HarnessError::reference(
            "generate-batch: the reference generated from other prompt ids than requested",
        ));
    }
    let ids: Vec<Vec<u32>> = serde_json::from_value(rows(&r.generated)).map_err(bad)?;
    let top_ids: Vec<Vec<Vec<u32>>> = serde_json::from_value(rows(&r.top_ids)).map_err(bad)?;
    let top_logits: Vec<Vec<Vec<Option<f32>>>> =
        serde_json::from_value(rows(&r.top_logits)).map_err(bad)?;
    if top_ids.len() != ids.len() || top_logits.len() != ids.len() {
        return Err(HarnessError::reference(
            "generate-batch: top_ids/top_logits do not match the rows",
        ));
    }
    Ok(ids
        .into_iter()
        .zip(top_ids.into_iter().zip(top_logits))
        .map(|(ids, (ti, tl))| GeneratedRow {
            ids,
            top: ti
                .into_iter()
                .zip(tl)
                .map(|(i, l)| i.into_iter().zip(l).collect())
                .collect(),
        })
        .collect())
}

fn generate_key(j: &GenerateJob) -> String {
    format!(
        "{}|{}|{:?}|{}|{}",
        j.model.display(),
        j.dtype,
        j.prompts,
        j.max_new_tokens,
        j.tie_within
    )
}

/// What a cached reference trace depends on besides the job: the size and modification time of
/// every file of the model folder, so a checkpoint changed in place is traced again.
/// (A GGUF model given as a file: that file's size and modification time.)
fn model_stamp(model: &Path) -> String {
    let stamp = |path: &Path| -> Option<String> {
        let m = std::fs::metadata(path).ok()?;
        let t = m
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        let name = path.file_name()?.to_string_lossy();
        Some(format!("{name}:{}:{}", m.len(), t.as_nanos()))
    };
    if model.is_file() {
        return stamp(model).unwrap_or_default();
    }
    let mut files: Vec<String> = std::fs::read_dir(model)
        .map(|rd| rd.filter_map(|e| stamp(&e.ok()?.path())).collect())
        .unwrap_or_default();
    files.sort();
    files.join(",")
}

/// What cached traces depend on in the reference's own code: the size and modification time of
/// every `.py` file of the `lockstep_reference` package (a changed reference runs again); for an
/// installed package, the python that runs it.
fn code_stamp(env: &ReferenceEnv) -> String {
    let Some(dir) = &env.package_dir else {
        return env.python.display().to_string();
    };
    let mut files: Vec<String> = std::fs::read_dir(dir.join("lockstep_reference"))
        .map(|rd| {
            rd.filter_map(|e| {
                let path = e.ok()?.path();
                if path.extension()? != "py" {
                    return None;
                }
                let m = std::fs::metadata(&path).ok()?;
                let t = m.modified().ok()?;
                let t = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
                let name = path.file_name()?.to_string_lossy().into_owned();
                Some(format!("{name}:{}:{t}", m.len()))
            })
            .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.join(",")
}

fn job_key(j: &TraceJob) -> String {
    format!(
        "{}|{:?}|{}|{}",
        j.model.display(),
        j.tokens,
        j.dtype,
        model_stamp(&j.model)
    )
}

/// What an op-level job's result depends on: the model files, the dtype and the test trace's
/// bytes (a changed engine writes another trace).
fn ops_key(j: &OpsJob) -> HarnessResult<String> {
    use sha2::{Digest, Sha256};
    // Streamed through the hasher: a 7B test trace is ~1.9 GB. A trace folder: each part file's
    // name and bytes, in the order the store reads them.
    let cannot = |e| HarnessError::io(format!("cannot read {}", j.test.display()), e);
    let store = lockstep_trace::TraceStore::open(&j.test)
        .map_err(|e| HarnessError::input(format!("{}: {e}", j.test.display())))?;
    let folder = j.test.is_dir();
    let mut hasher = Sha256::new();
    for path in store.files() {
        if let Some(name) = path.file_name().filter(|_| folder) {
            hasher.update(name.as_encoded_bytes());
        }
        let mut file = std::fs::File::open(path).map_err(cannot)?;
        std::io::copy(&mut file, &mut hasher).map_err(cannot)?;
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}|{}|{hex}|{}",
        j.model.display(),
        j.dtype,
        model_stamp(&j.model)
    ))
}

impl PythonReference {
    /// A cache `key` (a trace's or an op job's) tied to this reference's code: a trace cached by
    /// other reference code never matches it.
    fn keyed(&self, key: String) -> String {
        format!("{key}|{}", self.code)
    }

    /// A bf16-stored copy of the checkpoint folder `src` in `dst` (rounded to nearest even as
    /// transformers rounds), made by the reference unless `dst` already holds one of this `src`.
    pub fn bf16_copy(&self, src: &Path, dst: &Path) -> HarnessResult<()> {
        let stamp_file = dst.join("lockstep-bf16-of");
        let stamp = format!("{}|{}", src.display(), model_stamp(src));
        if std::fs::read_to_string(&stamp_file).ok().as_deref() == Some(&stamp) {
            return Ok(());
        }
        self.env
            .run(&["to-bf16", &src.to_string_lossy(), &dst.to_string_lossy()])?;
        std::fs::write(&stamp_file, stamp)
            .map_err(|e| HarnessError::io(format!("cannot write {}", stamp_file.display()), e))
    }
}

/// Whether op-level judgement can run on this model: the reference holds a float64 copy of it, or,
/// when that copy must be streamed ([`streamed`] in f64), computes the ops layer by layer, as it
/// does for a Hugging Face folder of every architecture but Qwen3-MoE (whose experts transformers
/// fuses at load time: `reference/lockstep_reference/streamed.py` does not stream it).
pub fn local_ops_supported(model: &Path) -> bool {
    !streamed(model, "f64")
        || lockstep_engine::ModelConfig::from_file(&model.join("config.json"))
            .is_ok_and(|c| c.arch != lockstep_engine::Architecture::Qwen3Moe)
}

impl Reference for PythonReference {
    fn warm_up(&mut self) {
        if self.server.is_none() {
            self.server = self.env.serve().ok();
        }
    }

    fn tokenize(&mut self, model: &Path, texts: &[String]) -> HarnessResult<Vec<Vec<u32>>> {
        let key = (model.to_path_buf(), texts.to_vec());
        if let Some(v) = self.tokenized.get(&key) {
            return Ok(v.clone());
        }
        let req = self.write_request("tokenize.json", &serde_json::json!(texts))?;
        let out = self.run(&[
            "tokenize-batch",
            "--model",
            &model.to_string_lossy(),
            "--texts",
            &req.to_string_lossy(),
        ])?;
        let v: Vec<Vec<u32>> = serde_json::from_value(Self::last_json_line(&out)?)
            .map_err(|e| bad_output("tokenize-batch", e))?;
        if v.len() != texts.len() {
            return Err(HarnessError::reference(
                "tokenize-batch returned the wrong number of results",
            ));
        }
        self.tokenized.insert(key, v.clone());
        Ok(v)
    }

    fn chat(
        &mut self,
        model: &Path,
        conversations: &serde_json::Value,
    ) -> HarnessResult<Vec<(String, Vec<u32>)>> {
        let req = self.write_request("chat.json", conversations)?;
        let out = self.run(&[
            "chat-batch",
            "--model",
            &model.to_string_lossy(),
            "--conversations",
            &req.to_string_lossy(),
        ])?;
        let answers: Vec<ChatAnswer> = serde_json::from_value(Self::last_json_line(&out)?)
            .map_err(|e| bad_output("chat-batch", e))?;
        Ok(answers.into_iter().map(|a| (a.text, a.ids)).collect())
    }

    fn weights(&mut self, model: &Path) -> HarnessResult<ReferenceWeights> {
        if let Some(w) = self.weights.get(model) {
            return Ok(w.clone());
        }
        let m = model.to_string_lossy();
        let mut args = vec!["weights", "--model", &m];
        if weights_streamed(model) {
            args.push("--streamed");
        }
        let out = self.run(&args)?;
        let w: ReferenceWeights = serde_json::from_value(Self::last_json_line(&out)?)
            .map_err(|e| bad_output("weights", e))?;
        self.weights.insert(model.to_path_buf(), w.clone());
        Ok(w)
    }

    fn generate(&mut self, jobs: &[GenerateJob]) -> HarnessResult<Vec<Vec<GeneratedRow>>> {
        let todo: Vec<&GenerateJob> = jobs
            .iter()
            .filter(|j| !self.generated.contains_key(&generate_key(j)))
            .collect();
        if !todo.is_empty() {
            let request: Vec<GenerateRequest> = todo
                .iter()
                .map(|j| {
                    let one = j.prompts.len() == 1;
                    GenerateRequest {
                        model: &j.model,
                        dtype: &j.dtype,
                        max_new_tokens: j.max_new_tokens,
                        ignore_eos: false,
                        tie_within: j.tie_within,
                        tokens: one.then(|| &j.prompts[0][..]),
                        token_batch: (!one).then_some(&j.prompts[..]),
                    }
                })
                .collect();
            let req = self.write_request("generate.json", &request)?;
            let out = self.run(&["generate-batch", &req.to_string_lossy()])?;
            let results: Vec<GenerateAnswer> = serde_json::from_value(Self::last_json_line(&out)?)
                .map_err(|e| bad_output("generate-batch", e))?;
            if results.len() != todo.len() {
                return Err(HarnessError::reference(
                    "generate-batch returned the wrong number of results",
                ));
            }
            for (j, r) in todo.iter().zip(&results) {
                let rows = generated_rows(r, &j.prompts)?;
                self.generated.insert(generate_key(j), rows);
            }
        }
        Ok(jobs
            .iter()
            .map(|j| self.generated[&generate_key(j)].clone())
            .collect())
    }

    fn traces(&mut self, jobs: &[TraceJob]) -> HarnessResult<()> {
        // A trace is reused when it exists and its sidecar records the same job.
        let sidecar = |j: &TraceJob| j.out.with_extension("job");
        let todo: Vec<&TraceJob> = jobs
            .iter()
            .filter(|j| {
                !(j.out.exists()
                    && std::fs::read_to_string(sidecar(j)).ok().as_deref()
                        == Some(&self.keyed(job_key(j))))
            })
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        // A trace rewritten is not the job its old sidecar records until this run finishes it.
        for j in &todo {
            let _ = std::fs::remove_file(sidecar(j));
        }
        let list: Vec<TraceRequest> = todo
            .iter()
            .map(|j| TraceRequest {
                model: &j.model,
                tokens: &j.tokens,
                dtype: &j.dtype,
                out: &j.out,
                streamed: streamed(&j.model, &j.dtype),
            })
            .collect();
        let req = self.write_request("traces.json", &list)?;
        self.run(&["trace-batch", &req.to_string_lossy()])?;
        for j in todo {
            std::fs::write(sidecar(j), self.keyed(job_key(j))).map_err(|e| {
                HarnessError::io(format!("cannot write {}", sidecar(j).display()), e)
            })?;
        }
        Ok(())
    }

    fn local_ops(&mut self, jobs: &[OpsJob]) -> HarnessResult<()> {
        // Reused when the outputs exist and the sidecar records the same model, dtype and trace.
        let sidecar = |j: &OpsJob| j.out_exact.with_extension("job");
        let mut todo = vec![];
        for j in jobs {
            let key = self.keyed(ops_key(j)?);
            let done = j.out_exact.exists()
                && j.out_reference.as_ref().is_none_or(|p| p.exists())
                && std::fs::read_to_string(sidecar(j)).ok().as_deref() == Some(&key);
            if !done {
                todo.push((j, key));
            }
        }
        if todo.is_empty() {
            return Ok(());
        }
        for (j, _) in &todo {
            let _ = std::fs::remove_file(sidecar(j));
        }
        let list: Vec<OpsRequest> = todo
            .iter()
            .map(|(j, _)| OpsRequest {
                model: &j.model,
                test: &j.test,
                dtype: &j.dtype,
                out_exact: &j.out_exact,
                out_reference: j.out_reference.as_deref(),
                streamed: streamed(&j.model, "f64"),
            })
            .collect();
        let req = self.write_request("ops.json", &list)?;
        self.run(&["ops-batch", &req.to_string_lossy()])?;
        for (j, key) in todo {
            std::fs::write(sidecar(j), key).map_err(|e| {
                HarnessError::io(format!("cannot write {}", sidecar(j).display()), e)
            })?;
        }
        Ok(())
    }
}
