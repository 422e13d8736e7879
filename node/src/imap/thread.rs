//! THREAD=ORDEREDSUBJECT and THREAD=REFERENCES (RFC 5256 sections 3 and 4), on messages
//! already described by their headers. Every walk over the tree uses explicit stacks: a
//! reply chain is as deep as its sender makes it. The loop checks of REFERENCES walk up
//! the tree; their total length per command is bounded (`ANCESTOR_STEPS_MAX`), and a
//! link that would pass the bound is left out, as if it made a loop.

use std::collections::HashMap;

/// References looked at per message: the last ones, nearest the message.
const REFERENCES_PER_MESSAGE_MAX: usize = 256;
/// Steps up the tree spent on loop checks in one THREAD command.
const ANCESTOR_STEPS_MAX: u64 = 20_000_000;

/// What threading needs of one message.
#[derive(Debug, Clone, Default)]
pub struct ThreadMessage {
    /// Its number in the answer (sequence number or UID).
    pub number: u32,
    /// Sent date (the Date: header, else INTERNALDATE) and sequence number: the order of
    /// siblings and threads.
    pub order: (i64, u32),
    pub message_id: Option<String>,
    /// References (or, without them, the first In-Reply-To), oldest first.
    pub references: Vec<String>,
    /// RFC 5256's base subject, and whether a reply or forward marker was taken off it.
    pub subject: String,
    pub reply: bool,
}

/// THREAD=ORDEREDSUBJECT: messages grouped by base subject, each group in sent order
/// under its first message, the groups in the order of their first messages.
pub fn ordered_subject(messages: &[ThreadMessage]) -> String {
    let mut sorted: Vec<&ThreadMessage> = messages.iter().collect();
    sorted.sort_by_key(|m| m.order);
    let mut groups: Vec<Vec<&ThreadMessage>> = Vec::new();
    let mut by_subject: HashMap<&str, usize> = HashMap::new();
    for m in sorted {
        match by_subject.get(m.subject.as_str()) {
            Some(&g) => groups[g].push(m),
            None => {
                by_subject.insert(m.subject.as_str(), groups.len());
                groups.push(vec![m]);
            }
        }
    }
    let mut out = String::new();
    for group in groups {
        out.push('(');
        out.push_str(&group[0].number.to_string());
        match &group[1..] {
            [] => {}
            [only] => out.push_str(&format!(" {}", only.number)),
            children => {
                out.push(' ');
                for c in children {
                    out.push_str(&format!("({})", c.number));
                }
            }
        }
        out.push(')');
    }
    out
}

/// A node of the REFERENCES tree: a message or a dummy (a message only referred to).
#[derive(Default, Clone)]
struct Node {
    message: Option<usize>,
    parent: Option<usize>,
    children: Vec<usize>,
}

struct Tree {
    nodes: Vec<Node>,
    steps_left: u64,
}

impl Tree {
    fn add(&mut self, message: Option<usize>) -> usize {
        self.nodes.push(Node { message, ..Node::default() });
        self.nodes.len() - 1
    }

    /// Whether `ancestor` is `node` or above it; `None` when the step budget ran out.
    fn is_ancestor(&mut self, ancestor: usize, node: usize) -> Option<bool> {
        // A node without children is above nothing: no walk (the usual case, a reply
        // threaded after what it replies to).
        if self.nodes[ancestor].children.is_empty() {
            return Some(ancestor == node);
        }
        let mut at = Some(node);
        while let Some(n) = at {
            if n == ancestor {
                return Some(true);
            }
            self.steps_left = self.steps_left.checked_sub(1)?;
            at = self.nodes[n].parent;
        }
        Some(false)
    }

    fn unlink(&mut self, child: usize) {
        if let Some(p) = self.nodes[child].parent.take() {
            self.nodes[p].children.retain(|c| *c != child);
        }
    }

    /// Makes `parent` the parent of `child` unless that would make a loop (or the loop
    /// check cannot be afforded).
    fn link(&mut self, parent: usize, child: usize) {
        if self.is_ancestor(child, parent) == Some(false) {
            self.unlink(child);
            self.nodes[child].parent = Some(parent);
            self.nodes[parent].children.push(child);
        }
    }

    /// Nodes under `roots`, each after all of its descendants.
    fn post_order(&self, roots: &[usize]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut stack: Vec<(usize, bool)> = roots.iter().rev().map(|r| (*r, false)).collect();
        while let Some((n, expanded)) = stack.pop() {
            if expanded {
                out.push(n);
            } else {
                stack.push((n, true));
                stack.extend(self.nodes[n].children.iter().rev().map(|c| (*c, false)));
            }
        }
        out
    }
}

/// THREAD=REFERENCES (RFC 5256 section 4).
pub fn references(messages: &[ThreadMessage]) -> String {
    let mut tree = Tree { nodes: Vec::new(), steps_left: ANCESTOR_STEPS_MAX };
    let mut by_id: HashMap<String, usize> = HashMap::new();
    // (1) Link each message under the messages it refers to.
    for (index, m) in messages.iter().enumerate() {
        // A missing or repeated Message-ID gets a node of its own.
        let own = match m.message_id.as_deref() {
            Some(id) => match by_id.get(id) {
                Some(&n) if tree.nodes[n].message.is_none() => {
                    tree.nodes[n].message = Some(index);
                    n
                }
                Some(_) => tree.add(Some(index)),
                None => {
                    let n = tree.add(Some(index));
                    by_id.insert(id.to_string(), n);
                    n
                }
            },
            None => tree.add(Some(index)),
        };
        let start = m.references.len().saturating_sub(REFERENCES_PER_MESSAGE_MAX);
        let mut previous: Option<usize> = None;
        for id in &m.references[start..] {
            let n = match by_id.get(id.as_str()) {
                Some(&n) => n,
                None => {
                    let n = tree.add(None);
                    by_id.insert(id.clone(), n);
                    n
                }
            };
            if let Some(p) = previous
                && tree.nodes[n].parent.is_none()
                && n != own
            {
                tree.link(p, n);
            }
            previous = Some(n);
        }
        // The message's own references decide its parent over what others said.
        tree.unlink(own);
        if let Some(p) = previous.filter(|p| *p != own) {
            tree.link(p, own);
        }
    }
    // (2), (3) The root set.
    let mut roots: Vec<usize> = (0..tree.nodes.len()).filter(|n| tree.nodes[*n].parent.is_none()).collect();
    drop(by_id);
    // (4) Dummies go: childless ones, and those whose children can take their place
    // (a root dummy with several children stays, holding them together).
    for n in tree.post_order(&roots) {
        if tree.nodes[n].message.is_some() {
            continue;
        }
        let children = std::mem::take(&mut tree.nodes[n].children);
        match tree.nodes[n].parent {
            Some(p) => {
                for c in &children {
                    tree.nodes[*c].parent = Some(p);
                }
                let siblings = &mut tree.nodes[p].children;
                if let Some(at) = siblings.iter().position(|s| *s == n) {
                    siblings.splice(at..=at, children);
                }
            }
            None if children.len() > 1 => tree.nodes[n].children = children,
            None => {
                for c in &children {
                    tree.nodes[*c].parent = None;
                }
                if let Some(at) = roots.iter().position(|r| *r == n) {
                    roots.splice(at..=at, children);
                }
            }
        }
    }
    // (5) Roots by sent date (a dummy by its earliest child).
    let order = orders(&mut tree, &roots, messages);
    roots.sort_by_key(|r| order[*r]);
    // (6) Roots with the same base subject join.
    let subject_of = |tree: &Tree, n: usize| -> Option<usize> {
        tree.nodes[n].message.or_else(|| tree.nodes[n].children.first().and_then(|c| tree.nodes[*c].message))
    };
    let mut table: HashMap<String, usize> = HashMap::new();
    for &r in &roots {
        let Some(m) = subject_of(&tree, r) else { continue };
        let subject = &messages[m].subject;
        if subject.is_empty() {
            continue;
        }
        let replace = match table.get(subject) {
            None => true,
            Some(&old) => {
                let (old_dummy, new_dummy) = (tree.nodes[old].message.is_none(), tree.nodes[r].message.is_none());
                let old_reply = subject_of(&tree, old).is_some_and(|o| messages[o].reply);
                // A dummy is preferred, then an original over a reply.
                !old_dummy && (new_dummy || (old_reply && !messages[m].reply))
            }
        };
        if replace {
            table.insert(subject.clone(), r);
        }
    }
    let mut candidates = roots.clone();
    for &r in &roots {
        let subject = subject_of(&tree, r).map(|m| messages[m].subject.clone()).filter(|s| !s.is_empty());
        let Some(subject) = subject else { continue };
        let Some(&head) = table.get(&subject) else { continue };
        if head != r && tree.nodes[r].parent.is_none() {
            let joined = join(&mut tree, head, r, messages);
            if joined != head {
                table.insert(subject, joined);
                candidates.push(joined);
            }
        }
    }
    // The threads that are left, in sent order (a dummy by its earliest child).
    let mut kept: Vec<usize> = candidates
        .into_iter()
        .filter(|r| {
            let node = &tree.nodes[*r];
            node.parent.is_none() && (node.message.is_some() || !node.children.is_empty())
        })
        .collect();
    kept.sort_unstable();
    kept.dedup();
    let order = orders(&mut tree, &kept, messages);
    kept.sort_by_key(|r| order[*r]);
    // (7) Siblings by sent date, at every level.
    let order = orders(&mut tree, &kept, messages);
    for n in tree.post_order(&kept) {
        let mut children = std::mem::take(&mut tree.nodes[n].children);
        children.sort_by_key(|c| order[*c]);
        tree.nodes[n].children = children;
    }
    render(&tree, &kept, messages)
}

/// Joins root `other` with `head`, the root the subject table names for their subject
/// (RFC 5256 4.(6)(C)); returns the root that holds both now.
fn join(tree: &mut Tree, head: usize, other: usize, messages: &[ThreadMessage]) -> usize {
    let adopt = |tree: &mut Tree, parent: usize, child: usize| {
        tree.nodes[child].parent = Some(parent);
        tree.nodes[parent].children.push(child);
    };
    match (tree.nodes[head].message, tree.nodes[other].message) {
        (None, None) => {
            for c in std::mem::take(&mut tree.nodes[other].children) {
                adopt(tree, head, c);
            }
            head
        }
        (None, Some(_)) => {
            adopt(tree, head, other);
            head
        }
        (Some(_), None) => {
            adopt(tree, other, head);
            other
        }
        (Some(h), Some(o)) if messages[o].reply && !messages[h].reply => {
            adopt(tree, head, other);
            head
        }
        (Some(h), Some(o)) if messages[h].reply && !messages[o].reply => {
            adopt(tree, other, head);
            other
        }
        (Some(_), Some(_)) => {
            let dummy = tree.add(None);
            adopt(tree, dummy, head);
            adopt(tree, dummy, other);
            dummy
        }
    }
}

/// Each node's place in sent order: its message's, or a dummy's earliest child's.
fn orders(tree: &mut Tree, roots: &[usize], messages: &[ThreadMessage]) -> Vec<(i64, u32)> {
    let mut order = vec![(i64::MAX, u32::MAX); tree.nodes.len()];
    for n in tree.post_order(roots) {
        order[n] = match tree.nodes[n].message {
            Some(m) => messages[m].order,
            None => tree.nodes[n].children.iter().map(|c| order[*c]).min().unwrap_or((i64::MAX, u32::MAX)),
        };
    }
    order
}

/// The threads in RFC 5256's syntax: "(1 2 (3)(4 5))": a node and its only child in
/// a row, several children each in parentheses; a dummy shows only its children.
fn render(tree: &Tree, roots: &[usize], messages: &[ThreadMessage]) -> String {
    enum Step {
        Text(&'static str),
        Members(usize),
    }
    let mut out = String::new();
    let mut stack: Vec<Step> = Vec::new();
    for &r in roots.iter().rev() {
        stack.push(Step::Text(")"));
        stack.push(Step::Members(r));
        stack.push(Step::Text("("));
    }
    while let Some(step) = stack.pop() {
        match step {
            Step::Text(t) => out.push_str(t),
            Step::Members(n) => {
                let node = &tree.nodes[n];
                let children = &node.children;
                if let Some(m) = node.message {
                    out.push_str(&messages[m].number.to_string());
                    if !children.is_empty() {
                        out.push(' ');
                    }
                }
                if node.message.is_some() && children.len() == 1 {
                    stack.push(Step::Members(children[0]));
                } else {
                    for c in children.iter().rev() {
                        stack.push(Step::Text(")"));
                        stack.push(Step::Members(*c));
                        stack.push(Step::Text("("));
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(number: u32, date: i64, id: Option<&str>, refs: &[&str], subject: &str, reply: bool) -> ThreadMessage {
        ThreadMessage {
            number,
            order: (date, number),
            message_id: id.map(str::to_string),
            references: refs.iter().map(|r| r.to_string()).collect(),
            subject: subject.into(),
            reply,
        }
    }

    #[test]
    fn imaptest_threads() {
        // thread: a loop is refused and the message's own references win.
        let msgs = [
            m(1, 17, Some("<a@b>"), &[], "", false),
            m(2, 15, Some("<b@b>"), &["<a@b>", "<c@b>"], "", false),
            m(3, 16, Some("<c@b>"), &["<b@b>"], "", false),
        ];
        assert_eq!(references(&msgs), "(3 2)(1)");
        assert_eq!(
            references(
                &msgs[1..]
                    .iter()
                    .cloned()
                    .enumerate()
                    .map(|(i, mut x)| {
                        x.number = i as u32 + 1;
                        x.order.1 = x.number;
                        x
                    })
                    .collect::<Vec<_>>()
            ),
            "(2 1)"
        );
        // thread2: a repeated Message-ID; thread6: a dummy root holds two messages.
        assert_eq!(
            references(&[m(1, 1, Some("<a@b>"), &[], "", false), m(2, 1, Some("<a@b>"), &[], "", false)]),
            "(1)(2)"
        );
        assert_eq!(
            references(&[m(1, 1, None, &["<a@b>"], "", false), m(2, 2, None, &["<a@b>"], "", false)]),
            "((1)(2))"
        );
        // thread3, thread4: joined by subject, the reply under the original.
        assert_eq!(
            references(&[m(1, 1, Some("<a@b>"), &[], "foo", false), m(2, 2, Some("<a@b>"), &[], "foo", true)]),
            "(1 2)"
        );
        assert_eq!(
            references(&[m(1, 1, Some("<a@b>"), &[], "foo", false), m(2, 2, Some("<b@b>"), &["<c@b>"], "foo", true)]),
            "(1 2)"
        );
        // thread7: a repeated Message-ID still hangs under its reference.
        let msgs = [
            m(1, 1, Some("<a@b>"), &[], "", false),
            m(2, 1, Some("<b@b>"), &["<a@b>"], "", false),
            m(3, 1, Some("<c@b>"), &["<b@b>"], "", false),
            m(4, 1, Some("<b@b>"), &["<a@b>"], "", false),
        ];
        assert_eq!(references(&msgs), "(1 (2 3)(4))");
        // Two messages with one subject and no replies: a dummy holds them.
        assert_eq!(references(&[m(1, 1, None, &[], "x", false), m(2, 2, None, &[], "x", false)]), "((1)(2))");
    }

    #[test]
    fn a_long_chain_renders_without_recursion() {
        let n = 50_000u32;
        let msgs: Vec<ThreadMessage> = (1..=n)
            .map(|i| {
                let refs: Vec<String> = if i > 1 { vec![format!("<{}>", i - 1)] } else { vec![] };
                ThreadMessage {
                    number: i,
                    order: (i64::from(i), i),
                    message_id: Some(format!("<{i}>")),
                    references: refs,
                    ..Default::default()
                }
            })
            .collect();
        let out = references(&msgs);
        assert!(out.starts_with("(1 2 3 ") && out.ends_with(" 50000)"), "{}", &out[..40]);
    }

    #[test]
    fn ordered_subject_groups() {
        let msgs = [
            m(1, 3, None, &[], "a", false),
            m(2, 1, None, &[], "b", false),
            m(3, 2, None, &[], "a", false),
            m(4, 4, None, &[], "b", false),
            m(5, 5, None, &[], "b", false),
            m(6, 6, None, &[], "c", false),
        ];
        assert_eq!(ordered_subject(&msgs), "(2 (4)(5))(3 1)(6)");
    }
}
