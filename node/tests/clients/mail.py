"""Drives tandem with mail clients nobody here wrote: Python's imaplib and smtplib.LMTP.

Usage: mail.py COMMAND ARGS... ; prints one JSON line on success, exits non-zero on any
failure (an unexpected server answer raises).
"""
import imaplib
import json
import smtplib
import sys
import time


def imap(port, user, password):
    c = imaplib.IMAP4("127.0.0.1", int(port))
    c.login(user, password)
    return c


def check(result):
    typ, data = result
    if typ != "OK":
        raise SystemExit(f"server said {typ}: {data}")
    return data


def tagged(conn, text):
    """Sends one command by hand (imaplib has no MOVE) and returns its tag and every line
    up to and including its tagged answer."""
    tag = conn._new_tag().decode()
    conn.send(f"{tag} {text}\r\n".encode())
    lines = []
    while not lines or not lines[-1].startswith(tag.encode()):
        lines.append(conn.readline())
    return tag, lines


def state(port, user, password, mailbox="INBOX"):
    """UIDVALIDITY, HIGHESTMODSEQ and (UID, sorted flags) of every message."""
    c = imap(port, user, password)
    data = check(c.status(mailbox, "(UIDVALIDITY HIGHESTMODSEQ MESSAGES)"))
    words = data[0].decode().split("(")[1].rstrip(")").split()
    status = dict(zip(words[::2], map(int, words[1::2])))
    check(c.select(mailbox, readonly=True))
    messages = []
    if status["MESSAGES"]:
        for line in check(c.uid("FETCH", "1:*", "(UID FLAGS)")):
            text = line.decode()
            uid = int(text.split("UID ")[1].split()[0].rstrip(")"))
            # \Recent is per server and per session (RFC 3501), not replicated state.
            flags = sorted(f for f in text.split("FLAGS (")[1].split(")")[0].split() if f != "\\Recent")
            messages.append([uid, flags])
    c.logout()
    return {"uidvalidity": status["UIDVALIDITY"], "highestmodseq": status["HIGHESTMODSEQ"], "messages": sorted(messages)}


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "lmtp":
        port, sender, n, *rcpts = args
        out = []
        for i in range(int(n)):
            with smtplib.LMTP("127.0.0.1", int(port)) as l:
                msg = f"From: {sender}\r\nTo: {', '.join(rcpts)}\r\nSubject: delivery {i}\r\nMessage-ID: <{i}.{time.time()}@test>\r\n\r\nbody {i}\r\n"
                refused = l.sendmail(sender, rcpts, msg)
                out.append(refused)
        print(json.dumps({"refused": out}))
    elif cmd in ("lmtp-temporary", "lmtp-unknown"):
        # A refusal: 451 after DATA when the durability promise cannot be kept (the MTA
        # retries), 550 at RCPT for an unknown user.
        port, rcpt = args
        with smtplib.LMTP("127.0.0.1", int(port)) as l:
            try:
                l.sendmail("a@b", [rcpt], "Subject: x\r\n\r\nx\r\n")
                raise SystemExit(f"{cmd}: the message was accepted")
            except smtplib.SMTPDataError as e:
                print(json.dumps({"code": e.smtp_code}))
            except smtplib.SMTPRecipientsRefused as e:
                print(json.dumps({"refused": {k: v[0] for k, v in e.recipients.items()}}))
    elif cmd == "state":
        print(json.dumps(state(*args)))
    elif cmd == "wait-count":
        port, user, password, count = args
        deadline = time.time() + 60
        while True:
            s = state(port, user, password)
            if len(s["messages"]) >= int(count):
                print(json.dumps(s))
                return
            if time.time() > deadline:
                raise SystemExit(f"only {len(s['messages'])} messages: {s}")
            time.sleep(0.2)
    elif cmd == "work":
        # Read, flag, search, copy, append and expunge on one server.
        port, user, password = args
        c = imap(port, user, password)
        caps = check(c.capability())[0].decode()
        assert "IMAP4REV1" in caps.upper() and "UIDPLUS" in caps, caps
        typ, data = c.select("INBOX")
        assert typ == "OK", data
        count = int(data[0])
        assert count >= 3, count
        data = check(c.fetch("1", "(UID FLAGS INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
        text = b"".join(x if isinstance(x, bytes) else b"".join(x) for x in data)
        assert b"Subject: delivery 0" in text, text
        assert b"ENVELOPE" in text and b"BODYSTRUCTURE" in text, text
        data = check(c.fetch("2", "(BODY[])"))
        assert b"body 1" in data[0][1], data
        # BODY[] (not PEEK) set \Seen on message 2.
        flags = check(c.fetch("2", "(FLAGS)"))[0]
        assert b"\\Seen" in flags, flags
        check(c.store("1", "+FLAGS", "(\\Flagged)"))
        found = check(c.search(None, "FLAGGED"))[0].split()
        assert found == [b"1"], found
        found = check(c.uid("SEARCH", None, "SUBJECT", '"delivery 2"'))[0].split()
        assert len(found) == 1, found
        typ, data = c.copy("1:2", "Nowhere")
        assert typ == "NO" and b"TRYCREATE" in data[0], data
        check(c.create("Archive"))
        typ, data = c.copy("1:2", "Archive")
        assert typ == "OK" and b"COPYUID" in data[0], data
        typ, data = c.append("INBOX", "(\\Draft)", None, b"Subject: appended\r\n\r\nhello\r\n")
        assert typ == "OK" and b"APPENDUID" in data[0], data
        check(c.store("3", "+FLAGS", "(\\Deleted)"))
        typ, data = c.expunge()
        assert typ == "OK" and data == [b"3"], data
        typ, data = c.list()
        names = b" ".join(data)
        assert b"INBOX" in names and b"Archive" in names, data
        try:
            c.xatom("FROBNICATE")
            raise SystemExit("a bad command was accepted")
        except imaplib.IMAP4.error as e:
            assert "BAD" in str(e) or "FROBNICATE" in str(e), e
        check(c.noop())  # the session goes on after BAD
        c.logout()
        print(json.dumps({"ok": True}))
    elif cmd == "bad-password":
        port, user = args
        start = time.time()
        try:
            imap(port, user, "wrong")
            raise SystemExit("a wrong password was accepted")
        except imaplib.IMAP4.error as e:
            print(json.dumps({"error": str(e), "seconds": time.time() - start}))
    elif cmd == "qresync-state":
        port, user, password = args
        c = imap(port, user, password)
        check(c.enable("QRESYNC"))
        s = state(port, user, password)
        print(json.dumps(s))
    elif cmd == "qresync-resume":
        # A QRESYNC client coming back with its cache: what vanished, what it sees now.
        port, user, password, uidvalidity, modseq, known = args
        c = imap(port, user, password)
        check(c.enable("QRESYNC"))
        typ, data = c._simple_command("SELECT", f"INBOX (QRESYNC ({uidvalidity} {modseq} {known}))")
        assert typ == "OK", data
        c.state = "SELECTED"  # imaplib's own select() takes no QRESYNC parameters
        vanished = []
        for v in c.untagged_responses.get("VANISHED", []):
            text = v.decode().replace("(EARLIER)", "").strip()
            for part in text.split(","):
                lo, _, hi = part.partition(":")
                vanished.extend(range(int(lo), int(hi or lo) + 1))
        uids = sorted(int(u) for u in check(c.uid("SEARCH", None, "ALL"))[0].split())
        c.logout()
        print(json.dumps({"vanished": sorted(vanished), "uids": uids}))
    elif cmd == "tls":
        import ssl
        port, imaps_port, user, password, cafile = args
        ctx = ssl.create_default_context(cafile=cafile)
        c = imaplib.IMAP4("127.0.0.1", int(port))
        assert "STARTTLS" in c.capabilities, c.capabilities
        check(c.starttls(ssl_context=ctx))
        c.login(user, password)
        check(c.select("INBOX"))
        c.logout()
        s = imaplib.IMAP4_SSL("127.0.0.1", int(imaps_port), ssl_context=ctx)
        assert "STARTTLS" not in s.capabilities, s.capabilities
        s.login(user, password)
        check(s.noop())
        s.logout()
        print(json.dumps({"ok": True}))
    elif cmd == "protocol-edges":
        # AUTHENTICATE PLAIN, an oversize literal refused before it is sent, MOVE.
        import base64
        port, user, password = args
        c = imaplib.IMAP4("127.0.0.1", int(port))
        check(c.authenticate("PLAIN", lambda _: f"\0{user}\0{password}".encode()))
        check(c.select("INBOX"))
        tag = c._new_tag().decode()
        c.send(f"{tag} APPEND INBOX {{999999999}}\r\n".encode())
        answer = c.readline()
        assert answer.startswith(f"{tag} BAD".encode()), answer
        check(c.noop())  # the session goes on
        # BINARY (RFC 3516): a message's whole size, and a part with an encoding nobody
        # can undo refused with UNKNOWN-CTE.
        typ, data = c.uid("FETCH", "1", "(UID BINARY.SIZE[])")
        assert typ == "OK" and b"BINARY.SIZE[] " in data[0], (typ, data)
        odd = b"Content-Transfer-Encoding: x-odd\r\n\r\nbegin\r\n"
        check(c.append("INBOX", None, None, odd))
        typ, data = c.fetch("*", "(BINARY.PEEK[1])")
        assert typ == "NO" and b"UNKNOWN-CTE" in data[0], (typ, data)
        check(c.noop())
        check(c.create("Moved"))
        typ, data = c.xatom("MOVE", "1", "Moved")
        assert typ == "OK", (typ, data)
        typ, data = c.status("Moved", "(MESSAGES)")
        assert typ == "OK" and b"MESSAGES 1" in data[0], data
        c.logout()
        print(json.dumps({"ok": True}))
    elif cmd == "copy-edges":
        # \Recent in one session only; COPY of a message another session expunged;
        # COPY and MOVE into the selected mailbox itself; MOVE's COPYUID before EXPUNGE.
        port, user, password = args
        a, b = imap(port, user, password), imap(port, user, password)
        check(a.create("Edges"))
        # One INTERNALDATE for all (no Date: header): THREAD's order below must not
        # depend on whether the appends straddle a second.
        for i in range(3):
            check(a.append("Edges", None, '"01-Jan-2020 00:00:00 +0000"', f"Subject: edge {i}\r\n\r\nx\r\n".encode()))
        typ, data = a.select("Edges")
        assert a.untagged_responses.get("RECENT") == [b"3"], a.untagged_responses
        check(b.select("Edges"))
        assert b.untagged_responses.get("RECENT") == [b"0"], b.untagged_responses
        flags = check(a.fetch("1", "(FLAGS)"))[0]
        assert b"\\Recent" in flags, flags
        assert check(a.search(None, "RECENT"))[0] == b"1 2 3"
        assert check(b.search(None, "OLD"))[0] == b"1 2 3"
        check(b.store("1", "+FLAGS", "\\Deleted"))
        check(b.expunge())
        # a has not been told of the expunge (COPY with sequence numbers holds it back).
        typ, data = a.copy("1", "INBOX")
        assert typ == "NO" and b"EXPUNGEISSUED" in data[0], (typ, data)
        check(a.noop())
        typ, data = a.copy("1", "Edges")
        assert typ == "OK" and b"COPYUID" in data[0], (typ, data)
        tag, lines = tagged(a, "MOVE 1 Edges")
        copyuid = next(i for i, l in enumerate(lines) if b"[COPYUID" in l)
        expunge = next(i for i, l in enumerate(lines) if l.endswith(b"EXPUNGE\r\n"))
        assert copyuid < expunge and lines[-1].startswith(f"{tag} OK".encode()), lines
        check(a.noop())
        assert check(a.search(None, "ALL"))[0] == b"1 2 3", a.search(None, "ALL")
        # SORT: now "edge 2", then the copy of "edge 1" and the moved "edge 1"; ties in
        # sequence order, also when the criterion is reversed.
        assert check(a.sort("(SUBJECT)", "UTF-8", "ALL"))[0] == b"2 3 1"
        assert check(a.sort("(REVERSE SUBJECT)", "UTF-8", "ALL"))[0] == b"1 2 3"
        # THREAD: the three share a subject and none is a reply: one dummy holds them.
        assert check(a.thread("REFERENCES", "UTF-8", "ALL"))[0] == b"(1)((2)(3))", a.thread("REFERENCES", "UTF-8", "ALL")
        assert check(a.thread("ORDEREDSUBJECT", "UTF-8", "ALL"))[0] == b"(1)(2 3)", a.thread("ORDEREDSUBJECT", "UTF-8", "ALL")
        typ, data = a.sort("(ARRIVAL)", "KOI8-R", "ALL")
        assert typ == "NO" and b"BADCHARSET" in data[0], (typ, data)
        # MOVE to Trash and straight back (an undo): the message is in Edges again, a
        # new UID with the same bytes and flags, and Trash is empty.
        def move(seq, dest):
            tag, lines = tagged(a, f"MOVE {seq} {dest}")
            assert lines[-1].startswith(f"{tag} OK".encode()), lines

        a.create("Trash")
        check(a.store("1", "+FLAGS", "\\Flagged"))
        moved = check(a.fetch("1", "(BODY.PEEK[])"))[0][1]
        move("1", "Trash")
        check(a.select("Trash"))
        move("1", "Edges")
        assert check(a.search(None, "ALL"))[0] == b"", a.search(None, "ALL")
        typ, data = a.select("Edges")
        assert data == [b"3"], data
        assert check(a.search(None, "FLAGGED"))[0] == b"3", a.search(None, "FLAGGED")
        assert check(a.fetch("3", "(BODY.PEEK[])"))[0][1] == moved
        a.logout()
        b.logout()
        print(json.dumps({"ok": True}))
    elif cmd == "compress":
        # COMPRESS=DEFLATE (RFC 4978) by hand (imaplib has none): raw DEFLATE both ways,
        # each command ended by a sync flush; the answers must inflate to whole lines.
        import socket
        import zlib
        port, user, password = args
        s = socket.create_connection(("127.0.0.1", int(port)), timeout=10)
        f = s.makefile("rb")
        assert f.readline().startswith(b"* OK")
        s.sendall(f'a LOGIN {user} "{password}"\r\n'.encode())
        while not (line := f.readline()).startswith(b"a "):
            pass
        assert line.startswith(b"a OK"), line
        assert b"COMPRESS=DEFLATE" in line, line
        s.sendall(b"b COMPRESS DEFLATE\r\n")
        line = f.readline()
        assert line.startswith(b"b OK"), line
        deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        inflate = zlib.decompressobj(-15)
        pending = b""

        def command(tag, text):
            nonlocal pending
            s.sendall(deflate.compress(f"{tag} {text}\r\n".encode()) + deflate.flush(zlib.Z_SYNC_FLUSH))
            lines = []
            while True:
                while b"\r\n" in pending:
                    line, pending = pending.split(b"\r\n", 1)
                    lines.append(line)
                    if line.startswith(f"{tag} ".encode()):
                        return lines
                chunk = s.recv(65536)
                assert chunk, "connection closed"
                pending += inflate.decompress(chunk)

        lines = command("c", "COMPRESS DEFLATE")
        assert lines[-1].startswith(b"c NO [COMPRESSIONACTIVE]"), lines
        lines = command("d", "SELECT INBOX")
        assert lines[-1].startswith(b"d OK"), lines
        exists = next(int(l.split()[1]) for l in lines if l.endswith(b" EXISTS"))
        body = b"Subject: compressed\r\n\r\n" + b"the same words again " * 2000 + b"\r\n"
        s.sendall(deflate.compress(f"e APPEND INBOX {{{len(body)}+}}\r\n".encode() + body + b"\r\n") + deflate.flush(zlib.Z_SYNC_FLUSH))
        lines = command("f", "NOOP")
        assert any(l.startswith(b"e OK") for l in lines), lines
        lines = command("g", f"FETCH {exists + 1} BODY.PEEK[]")
        assert lines[-1].startswith(b"g OK"), lines
        assert sum(l.count(b"the same words again") for l in lines) == 2000, lines[:3]
        lines = command("h", "LOGOUT")
        assert lines[-1].startswith(b"h OK"), lines
        print(json.dumps({"exists": exists + 1}))
    elif cmd == "idle":
        # Waits in IDLE until another client's APPEND shows up as EXISTS.
        port, user, password, other_port = args
        c = imap(port, user, password)
        typ, data = c.select("INBOX")
        before = int(data[0])
        tag = c._new_tag().decode()
        c.send(f"{tag} IDLE\r\n".encode())
        assert c.readline().startswith(b"+"), "IDLE continuation"
        o = imap(other_port, user, password)
        check(o.append("INBOX", None, None, b"Subject: during idle\r\n\r\nx\r\n"))
        o.logout()
        # The node wakes an IDLE session on each change (its fallback poll is 30 s):
        # 5 s is far above a wake-up on loopback and far below the poll.
        deadline = time.time() + 5
        seen = None
        while time.time() < deadline:
            line = c.readline()
            if line.endswith(b"EXISTS\r\n"):
                seen = int(line.split()[1])
                break
        c.send(b"DONE\r\n")
        # Untagged responses (RECENT after EXISTS) may still come before the tagged one.
        line = c.readline()
        while line.startswith(b"* "):
            line = c.readline()
        assert line.startswith(f"{tag} OK".encode()), line
        assert seen == before + 1, (before, seen)
        c.logout()
        print(json.dumps({"exists": seen}))
    elif cmd == "lifecycle":
        # CREATE on one server, seen on the others; RENAME and DELETE likewise.
        a, b, cc, user, password = args
        names = lambda port: [line.decode().rsplit(" ", 1)[-1].strip('"') for line in check(imap(port, user, password).list())]
        x = imap(a, user, password)
        check(x.create("Projects"))
        typ, data = x.create("Projects")
        assert typ == "NO" and b"ALREADYEXISTS" in data[0], data
        wait = lambda cond: next((True for _ in range(150) if cond() or time.sleep(0.2)), False)
        assert wait(lambda: "Projects" in names(b)), names(b)
        y = imap(b, user, password)
        typ, data = y.select("Projects")
        assert typ == "OK" and data == [b"0"], data
        check(y.append("Projects", None, None, b"Subject: plan\r\n\r\nx\r\n"))
        check(y.select("Projects"))
        validity = y.response("UIDVALIDITY")[1][0]
        uids = check(y.uid("SEARCH", "ALL"))[0]
        y.logout()
        check(x.rename("Projects", "Done"))
        assert wait(lambda: "Done" in names(cc) and "Projects" not in names(cc)), names(cc)
        z = imap(cc, user, password)
        typ, data = z.select("Done")
        assert typ == "OK" and data == [b"1"], data
        # One RENAME in the core: the new name keeps the UIDs, under a UIDVALIDITY of the
        # rename's path (not the old name's; README, "RENAME").
        moved = z.response("UIDVALIDITY")[1][0]
        assert moved != validity and None not in (validity, moved), (validity, moved)
        assert check(z.uid("SEARCH", "ALL"))[0] == uids, uids
        z.close()
        check(z.delete("Done"))
        typ, data = z.delete("INBOX")
        assert typ == "NO", data
        z.logout()
        assert wait(lambda: "Done" not in names(a)), names(a)
        x.logout()
        print(json.dumps({"ok": True}))
    elif cmd == "flag":
        port, user, password, uid, flag = args
        c = imap(port, user, password)
        check(c.select("INBOX"))
        check(c.uid("STORE", uid, "+FLAGS", f"({flag})"))
        c.logout()
        print(json.dumps({"ok": True}))
    elif cmd == "append":
        port, user, password, subject = args
        c = imap(port, user, password)
        typ, data = c.append("INBOX", None, None, f"Subject: {subject}\r\n\r\nx\r\n".encode())
        assert typ == "OK", data
        c.logout()
        print(json.dumps({"ok": data[0].decode()}))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
