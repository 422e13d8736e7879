"""Fills and reads IMAP accounts for the migration tests (tandem import/export), with
Python's imaplib: a client nobody here wrote, speaking to Dovecot and to tandem alike.

Usage:
  migration.py fill PORT USER PASSWORD COUNT   APPEND COUNT messages over 5 folders
                                               (flags, keywords, INTERNALDATEs), then
                                               expunge some so UIDs have gaps
  migration.py listing PORT USER PASSWORD      every folder: UIDVALIDITY and, per
                                               message, UID, flags, INTERNALDATE and the
                                               SHA-256 of its bytes
Prints one JSON line; exits non-zero on any failure.
"""
import hashlib
import imaplib
import json
import os
import re
import sys
import time

FOLDERS = ["INBOX", "Work", "Work/Projects", "Lists", "Archive"]
FLAG_SETS = [
    r"(\Seen)",
    r"(\Seen \Flagged)",
    r"(\Answered \Seen $Label1)",
    r"()",
    r"(\Draft work)",
    r"(\Seen $Junk project-x)",
    r"(\Flagged $Label1 work)",
]


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mail import check, imap as login  # noqa: E402  (the same login and answer check)


def delimiter(c):
    line = check(c.list('""', '""'))[0].decode()
    m = re.search(r'\) "(.)"', line)
    return m.group(1) if m else "/"


def server_name(folder, sep):
    return folder.replace("/", sep)


def fill(port, user, password, count):
    c = login(port, user, password)
    sep = delimiter(c)
    for f in FOLDERS[1:]:
        c.create(server_name(f, sep))
    c.subscribe(server_name("Work", sep))
    c.subscribe(server_name("Lists", sep))
    for i in range(count):
        folder = server_name(FOLDERS[i % len(FOLDERS)], sep)
        flags = FLAG_SETS[i % len(FLAG_SETS)]
        date = imaplib.Time2Internaldate(1_500_000_000 + i * 3637)
        body = (
            f"From: sender{i % 13}@example.net\r\nTo: {user}\r\nSubject: message {i} caf\u00e9\r\n"
            f"Message-ID: <m{i}@example.net>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            + f"line {i} of a body that is long enough to matter \u00e9\u00e8\r\n" * (1 + i % 40)
        ).encode()
        check(c.append(folder, flags, date, body))
    # Gaps: every eleventh message of INBOX and Lists is expunged.
    for f in ("INBOX", "Lists"):
        check(c.select(server_name(f, sep)))
        uids = check(c.uid("SEARCH", "ALL"))[0].split()
        doomed = b",".join(uids[::11])
        if doomed:
            check(c.uid("STORE", doomed, "+FLAGS.SILENT", r"(\Deleted)"))
            check(c.expunge())
    c.logout()
    return {"filled": count}


def listing(port, user, password):
    c = login(port, user, password)
    sep = delimiter(c)
    out = {}
    for line in check(c.list()):
        text = line.decode()
        name = re.search(r'\) "(.|NIL)" (.*)$', text).group(2).strip('"')
        if "\\Noselect" in text:
            continue
        status = check(c.status(f'"{name}"', "(UIDVALIDITY MESSAGES)"))[0].decode()
        validity = int(re.search(r"UIDVALIDITY (\d+)", status).group(1))
        messages = []
        check(c.select(f'"{name}"', readonly=True))
        if int(re.search(r"MESSAGES (\d+)", status).group(1)):
            data = check(c.uid("FETCH", "1:*", "(UID FLAGS INTERNALDATE BODY.PEEK[])"))
            for item in data:
                if not isinstance(item, tuple):
                    continue
                head, body = item[0].decode(), item[1]
                uid = int(re.search(r"UID (\d+)", head).group(1))
                flags = sorted(f for f in re.search(r"FLAGS \(([^)]*)\)", head).group(1).split() if f != "\\Recent")
                date = re.search(r'INTERNALDATE "([^"]+)"', head).group(1)
                stamp = int(time.mktime(imaplib.Internaldate2tuple(f'INTERNALDATE "{date}"'.encode())))
                messages.append([uid, flags, stamp, hashlib.sha256(body).hexdigest()])
        messages.sort()
        folder = "INBOX" if name.upper() == "INBOX" else name.replace(sep, "/")
        out[folder] = {"uidvalidity": validity, "messages": messages}
    subscribed = sorted(
        re.search(r'\) "(.|NIL)" (.*)$', l.decode()).group(2).strip('"').replace(sep, "/") for l in check(c.lsub()) if l
    )
    out["subscribed"] = subscribed
    c.logout()
    return out


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "fill":
        result = fill(args[0], args[1], args[2], int(args[3]))
    elif cmd == "listing":
        result = listing(args[0], args[1], args[2])
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
