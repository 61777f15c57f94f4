//! Field path -> line, from the YAML event stream.

use std::collections::HashMap;

/// Maps field paths as serde_yaml spells them (`routes[1].session.write`) to
/// the 1-based line where the field's key (or the sequence item) starts.
#[derive(Default, Debug)]
pub struct LineIndex {
    lines: HashMap<String, usize>,
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

struct IndexBuilder {
    stack: Vec<Frame>,
    index: LineIndex,
}

impl IndexBuilder {
    /// Path of the node that starts now, recording its line; advances the
    /// parent frame. Returns None when this scalar is a mapping key.
    fn node_path(&mut self, line: usize, is_scalar: bool, scalar: &str) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { path, key }) => match key.take() {
                None => {
                    if is_scalar {
                        let p = join(path, scalar);
                        self.index.lines.entry(p).or_insert(line);
                        *key = Some(scalar.to_string());
                    }
                    None
                }
                Some(k) => Some(join(path, &k)),
            },
            Some(Frame::Seq { path, index }) => {
                let p = format!("{path}[{index}]");
                *index += 1;
                self.index.lines.entry(p.clone()).or_insert(line);
                Some(p)
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl yaml_rust2::parser::MarkedEventReceiver for IndexBuilder {
    fn on_event(&mut self, ev: yaml_rust2::Event, mark: yaml_rust2::scanner::Marker) {
        use yaml_rust2::Event;
        let line = mark.line();
        match ev {
            Event::Scalar(s, ..) => {
                self.node_path(line, true, &s);
            }
            Event::Alias(_) => {
                self.node_path(line, false, "");
            }
            Event::MappingStart(..) => {
                if let Some(p) = self.node_path(line, false, "") {
                    self.stack.push(Frame::Map { path: p, key: None });
                } else {
                    // A complex mapping key: track it so the stack stays balanced.
                    self.stack.push(Frame::Map {
                        path: "?".into(),
                        key: None,
                    });
                }
            }
            Event::SequenceStart(..) => {
                let p = self
                    .node_path(line, false, "")
                    .unwrap_or_else(|| "?".into());
                self.stack.push(Frame::Seq { path: p, index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

impl LineIndex {
    pub fn build(text: &str) -> LineIndex {
        let mut b = IndexBuilder {
            stack: Vec::new(),
            index: LineIndex::default(),
        };
        let mut parser = yaml_rust2::parser::Parser::new_from_str(text);
        // Syntax errors are reported by serde_yaml; the index is best effort.
        let _ = parser.load(&mut b, false);
        b.index
    }

    /// The line of `path`, or of its nearest ancestor that has one.
    pub fn line(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(l) = self.lines.get(p) {
                return Some(*l);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    /// The deepest path under `parent` that starts on `line`.
    pub(super) fn field_on_line(&self, parent: &str, line: usize) -> Option<&str> {
        self.lines
            .iter()
            .filter(|(p, l)| **l == line && (parent.is_empty() || p.starts_with(parent)))
            .map(|(p, _)| p.as_str())
            .max_by_key(|p| p.len())
    }
}
