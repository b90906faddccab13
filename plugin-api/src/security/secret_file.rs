//! Files holding secrets (identity keys, network keys): owner-only, never overwritten.

use super::KeyFileError;
use std::path::Path;

/// Reads the text of a secret file, refusing one that group or others may read (as ssh does),
/// since its secret could already have leaked. `what` names the secret in that error.
pub(crate) fn read_owner_only(path: &Path, what: &str) -> Result<String, KeyFileError> {
    let error = |reason: String| KeyFileError { path: path.display().to_string(), reason };
    let metadata = std::fs::metadata(path).map_err(|e| error(format!("cannot read: {e}")))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(error(format!(
                "permissions {mode:03o} let others read the {what}; run `chmod 600 {}`",
                path.display()
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = (metadata, what);
    std::fs::read_to_string(path).map_err(|e| error(format!("cannot read: {e}")))
}

/// Creates `path` with owner-only permissions (`0600` from the start, so the secret is never
/// readable by others even for a moment) and writes `text`; refuses to overwrite a file.
pub(crate) fn write_new_owner_only(path: &Path, text: &str) -> Result<(), KeyFileError> {
    use std::io::Write;
    let error = |reason: String| KeyFileError { path: path.display().to_string(), reason };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| error(format!("cannot create: {e}")))?;
    file.write_all(text.as_bytes()).map_err(|e| error(format!("cannot write: {e}")))
}
