//! Mail users: a TOML file of names and argon2 password hashes.
//!
//! ```toml
//! [[user]]
//! name = "alice@example.org"
//! password = "$argon2id$v=19$m=19456,t=2,p=1$..."
//! ```
//!
//! `tandem user add NAME --users FILE` appends one (the password is read from standard
//! input). A user's mailboxes are those whose key's user is the user's name.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    user: Vec<UserEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    name: String,
    password: String,
}

/// Names must be usable as the user part of a mailbox key and as an LMTP recipient.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.chars().all(|c| c.is_ascii_graphic() && c != '/' && c != '"')
}

#[derive(Debug, Clone, Default)]
pub struct Users {
    hashes: BTreeMap<String, String>,
    /// Names with their domain lowercased, and names wholly lowercased, to the name.
    by_domain_case: BTreeMap<String, String>,
    by_any_case: BTreeMap<String, String>,
}

/// `local@domain` with the domain lowercased (domains never depend on case).
fn fold_domain(name: &str) -> String {
    match name.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", domain.to_ascii_lowercase()),
        None => name.to_string(),
    }
}

impl Users {
    pub fn load(path: &Path) -> Result<Users, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file: UsersFile = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut hashes = BTreeMap::new();
        for (i, u) in file.user.into_iter().enumerate() {
            if !valid_name(&u.name) {
                return Err(format!("{}: user[{i}].name {:?} is not a valid user name", path.display(), u.name));
            }
            PasswordHash::new(&u.password)
                .map_err(|e| format!("{}: user[{i}].password is not a password hash: {e}", path.display()))?;
            if hashes.insert(u.name.clone(), u.password).is_some() {
                return Err(format!("{}: user {:?} appears twice", path.display(), u.name));
            }
        }
        let mut users = Users { hashes, ..Users::default() };
        for name in users.hashes.keys() {
            users.by_domain_case.entry(fold_domain(name)).or_insert_with(|| name.clone());
            users.by_any_case.entry(name.to_ascii_lowercase()).or_insert_with(|| name.clone());
        }
        Ok(users)
    }

    /// The user an LMTP recipient names: the exact name, else the name with the domain
    /// compared without case, else (with `ignore_case_local`) the whole address without
    /// case.
    pub fn recipient(&self, rcpt: &str, ignore_case_local: bool) -> Option<&str> {
        if let Some((name, _)) = self.hashes.get_key_value(rcpt) {
            return Some(name);
        }
        if let Some(name) = self.by_domain_case.get(&fold_domain(rcpt)) {
            return Some(name);
        }
        if ignore_case_local {
            return self.by_any_case.get(&rcpt.to_ascii_lowercase()).map(String::as_str);
        }
        None
    }

    /// True when `password` is this user's. Unknown users cost the same work as known
    /// ones, so timing does not tell which names exist.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    pub fn verify(&self, name: &str, password: &[u8]) -> bool {
        const DUMMY: &str =
            "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$3ZFm0pJ8fgUkM3nm1KqUL2xAqKWwI1N1m7Yd7jeq2Mc";
        let stored = self.hashes.get(name).map(String::as_str).unwrap_or(DUMMY);
        let Ok(hash) = PasswordHash::new(stored) else { return false };
        Argon2::default().verify_password(password, &hash).is_ok() && self.hashes.contains_key(name)
    }
}

pub fn hash_password(password: &[u8]) -> Result<String, String> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|e| e.to_string())?;
    Argon2::default().hash_password(password, &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Adds (or replaces) a user in the file, creating it if needed.
pub fn add_user(path: &Path, name: &str, password: &[u8]) -> Result<(), String> {
    if !valid_name(name) {
        return Err(format!("{name:?} is not a valid user name"));
    }
    if password.is_empty() {
        return Err("empty password".into());
    }
    let mut file: UsersFile = match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => UsersFile::default(),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let hash = hash_password(password)?;
    file.user.retain(|u| u.name != name);
    file.user.push(UserEntry { name: name.to_string(), password: hash });
    write_users_file(path, &file)
}

fn read_users_file(path: &Path) -> Result<UsersFile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Replaces the file whole (a rename: a node reading it sees the old or the new one).
fn write_users_file(path: &Path, file: &UsersFile) -> Result<(), String> {
    let text = toml::to_string(file).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("tmp");
    write_private(&tmp, text.as_bytes())?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Removes a user from the file (their mail stays in the store). Err when there is no
/// such user, so a typo is not taken for a removal.
pub fn remove_user(path: &Path, name: &str) -> Result<(), String> {
    let mut file = read_users_file(path)?;
    let before = file.user.len();
    file.user.retain(|u| u.name != name);
    if file.user.len() == before {
        return Err(format!("no user {name:?} in {}", path.display()));
    }
    write_users_file(path, &file)
}

/// The names in the file, in its order.
pub fn list_users(path: &Path) -> Result<Vec<String>, String> {
    Ok(read_users_file(path)?.user.into_iter().map(|u| u.name).collect())
}

/// Writes a file only its owner can read (mode 0600 from its creation on: hashes and
/// secrets are never readable, not even for a moment).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // create_new with a mode is subject to the umask, which can only take bits away.
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    file.sync_all().map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_users_verify_and_wrong_passwords_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.toml");
        add_user(&path, "alice@example.org", b"correct horse").unwrap();
        add_user(&path, "bob@example.org", b"battery staple").unwrap();
        add_user(&path, "alice@example.org", b"new one").unwrap();
        let users = Users::load(&path).unwrap();
        assert!(users.verify("alice@example.org", b"new one"));
        assert!(!users.verify("alice@example.org", b"correct horse"));
        assert!(users.verify("bob@example.org", b"battery staple"));
        assert!(!users.verify("carol@example.org", b"battery staple"));
        assert!(add_user(&path, "bad/name", b"x").is_err());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(users.recipient("alice@EXAMPLE.org", false), Some("alice@example.org"));
        assert_eq!(users.recipient("Alice@example.org", false), None);
        assert_eq!(users.recipient("Alice@Example.ORG", true), Some("alice@example.org"));
        assert_eq!(users.recipient("carol@example.org", true), None);
        assert_eq!(list_users(&path).unwrap(), ["bob@example.org", "alice@example.org"]);
        remove_user(&path, "bob@example.org").unwrap();
        assert!(remove_user(&path, "bob@example.org").is_err(), "removing nobody is an error");
        assert_eq!(list_users(&path).unwrap(), ["alice@example.org"]);
        assert!(Users::load(&path).unwrap().verify("alice@example.org", b"new one"));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
