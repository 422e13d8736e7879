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
        Ok(Users { hashes })
    }

    pub fn exists(&self, name: &str) -> bool {
        self.hashes.contains_key(name)
    }

    /// True when `password` is this user's. Unknown users cost the same work as known
    /// ones, so timing does not tell which names exist.
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
    let text = toml::to_string(&file).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
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
    }
}
