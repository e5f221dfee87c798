//! Where a model's files are, resolved once from the path the user named: a Hugging Face folder,
//! or a GGUF checkpoint (a `.gguf` file, or a folder holding exactly one and no safetensors).
//! Loading the weights, the tokenizer, the chat template and the generation defaults all read the
//! same [`ModelSource`], so none of them guesses the format again.

use crate::error::Result;
use std::path::{Path, PathBuf};

/// A model's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face folder: config.json, safetensors, tokenizer.json, ... (whether it exists is
    /// checked by what reads it, which names the missing file).
    Folder(PathBuf),
    /// A GGUF checkpoint.
    Gguf {
        /// The `.gguf` file.
        file: PathBuf,
        /// The folder the user named, when they named a folder rather than the file (its
        /// generation_config.json then applies).
        named_folder: Option<PathBuf>,
    },
}

impl ModelSource {
    /// Resolves what `path` names (see [`crate::gguf::locate`] for how a GGUF is recognised).
    pub fn resolve(path: &Path) -> Result<Self> {
        Ok(match crate::gguf::locate(path)? {
            Some(file) => ModelSource::Gguf {
                named_folder: (file != path).then(|| path.to_path_buf()),
                file,
            },
            None => ModelSource::Folder(path.to_path_buf()),
        })
    }

    /// The GGUF file, when the model is one.
    pub fn gguf(&self) -> Option<&Path> {
        match self {
            ModelSource::Gguf { file, .. } => Some(file),
            ModelSource::Folder(_) => None,
        }
    }

    /// The folder side files are read from (tokenizer.json, tokenizer_config.json,
    /// chat_template.jinja): the model folder, or the one holding the GGUF file.
    pub fn side_folder(&self) -> &Path {
        match self {
            ModelSource::Folder(dir) => dir,
            ModelSource::Gguf { file, .. } => file.parent().unwrap_or(Path::new(".")),
        }
    }

    /// The folder whose generation_config.json applies: the model folder, or the folder the user
    /// named for a GGUF (a GGUF named as a file has none: its defaults come from its metadata).
    pub fn generation_config_folder(&self) -> Option<&Path> {
        match self {
            ModelSource::Folder(dir) => Some(dir),
            ModelSource::Gguf { named_folder, .. } => named_folder.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gguf_is_recognised_once_by_file_or_folder() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("m.gguf");
        std::fs::write(&file, b"GGUF\x03\0\0\0").unwrap();
        let by_folder = ModelSource::resolve(d.path()).unwrap();
        assert_eq!(by_folder.gguf(), Some(file.as_path()));
        assert_eq!(by_folder.side_folder(), d.path());
        assert_eq!(by_folder.generation_config_folder(), Some(d.path()));
        let by_file = ModelSource::resolve(&file).unwrap();
        assert_eq!(by_file.gguf(), Some(file.as_path()));
        assert_eq!(by_file.side_folder(), d.path());
        assert_eq!(by_file.generation_config_folder(), None);
        // Safetensors beside it: a Hugging Face folder.
        std::fs::write(d.path().join("model.safetensors"), b"").unwrap();
        let hf = ModelSource::resolve(d.path()).unwrap();
        assert_eq!(hf, ModelSource::Folder(d.path().to_path_buf()));
        assert_eq!(hf.gguf(), None);
        assert_eq!(hf.generation_config_folder(), Some(d.path()));
    }
}
