//! The default transport: a maildir under the data folder (`<data>/maildir/{tmp,new,cur}`), one
//! `<email id>.eml` file per email, written to `tmp/`, fsynced and renamed into `new/`, so a
//! reader never sees half an email and an email delivered again never leaves two files.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::MailError;

/// A maildir that emails are delivered into.
#[derive(Debug, Clone)]
pub struct Maildir {
    root: PathBuf,
}

impl Maildir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file an email with this id is delivered to.
    pub fn path_of(&self, email_id: &str) -> PathBuf {
        self.root.join("new").join(format!("{email_id}.eml"))
    }

    /// Delivers `message` under `email_id` (checked by the caller); an id delivered before is
    /// left as it is.
    pub(super) fn deliver(&self, email_id: &str, message: &str) -> Result<(), MailError> {
        let file = format!("{email_id}.eml");
        let delivered = self.root.join("new").join(&file);
        if delivered.exists() || self.root.join("cur").join(&file).exists() {
            return Ok(());
        }
        for folder in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(self.root.join(folder))?;
        }
        let staged = self.root.join("tmp").join(&file);
        let mut out = std::fs::File::create(&staged)?;
        out.write_all(message.as_bytes())?;
        out.sync_all()?;
        std::fs::rename(&staged, &delivered)?;
        std::fs::File::open(self.root.join("new"))?.sync_all()?;
        Ok(())
    }

    /// The ids of delivered emails, sorted.
    pub fn delivered(&self) -> std::io::Result<Vec<String>> {
        let mut ids = Vec::new();
        for folder in ["new", "cur"] {
            let Ok(entries) = std::fs::read_dir(self.root.join(folder)) else {
                continue;
            };
            for entry in entries {
                let name = entry?.file_name().to_string_lossy().into_owned();
                if let Some(id) = name.strip_suffix(".eml") {
                    ids.push(id.to_owned());
                }
            }
        }
        ids.sort();
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_each_id_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let maildir = Maildir::new(dir.path());
        maildir
            .deliver("abc-1", "Subject: one\r\n\r\nfirst")
            .expect("deliver");
        maildir
            .deliver("abc-1", "Subject: two\r\n\r\nsecond")
            .expect("again");
        assert_eq!(maildir.delivered().expect("list"), ["abc-1"]);
        let text = std::fs::read_to_string(maildir.path_of("abc-1")).expect("read");
        assert!(text.contains("first"), "the first delivery stays");
    }
}
