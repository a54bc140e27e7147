//! Stop strings held back across token boundaries: text that could still
//! become a stop string is not streamed until the next pieces decide.

/// Holds back text that could be the start of a stop string.
pub(crate) struct StopMatcher {
    pub(crate) stops: Vec<String>,
    pub(crate) held: String,
}

impl StopMatcher {
    /// Adds text; returns (text safe to emit, the stop string if one matched).
    pub(crate) fn push(&mut self, text: &str) -> (String, Option<String>) {
        self.held.push_str(text);
        if self.stops.is_empty() {
            return (std::mem::take(&mut self.held), None);
        }
        // The earliest match wins.
        let mut best: Option<(usize, &String)> = None;
        for s in &self.stops {
            if let Some(i) = self.held.find(s.as_str()) {
                if best.is_none_or(|(j, _)| i < j) {
                    best = Some((i, s));
                }
            }
        }
        if let Some((i, s)) = best {
            let out = self.held[..i].to_string();
            let s = s.clone();
            self.held.clear();
            return (out, Some(s));
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for k in (1..s.len()).rev() {
                if k <= keep {
                    break;
                }
                if s.is_char_boundary(k) && self.held.ends_with(&s[..k]) {
                    keep = k;
                    break;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, None)
    }

    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let mut m = StopMatcher {
            stops: stops.iter().map(|s| s.to_string()).collect(),
            held: String::new(),
        };
        let mut out = String::new();
        for p in pieces {
            let (t, hit) = m.push(p);
            out.push_str(&t);
            if hit.is_some() {
                return (out, hit);
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    #[test]
    fn stop_strings_across_pieces() {
        assert_eq!(
            run(&["END"], &["hello E", "N", "D more"]),
            ("hello ".into(), Some("END".into()))
        );
        assert_eq!(
            run(&["END"], &["hello E", "N", "d"]),
            ("hello ENd".into(), None)
        );
        assert_eq!(
            run(&["\n\n", "xy"], &["a\n", "b x", "y"]),
            ("a\nb ".into(), Some("xy".into()))
        );
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), None));
        assert_eq!(
            run(&["é!"], &["café", "!"]),
            ("caf".into(), Some("é!".into()))
        );
    }

    #[test]
    fn holds_back_only_possible_prefixes() {
        let mut m = StopMatcher {
            stops: vec!["STOP".into()],
            held: String::new(),
        };
        assert_eq!(m.push("abcST"), ("abc".into(), None));
        assert_eq!(m.push("x"), ("STx".into(), None));
    }
}
