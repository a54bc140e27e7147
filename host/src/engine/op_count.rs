//! Counting the operations of one lazy step (`RMLX_COUNT_OPS=1`): the
//! primitives MLX would run to evaluate a graph, by kind. On a GPU backend
//! each primitive is about one kernel launch (a compiled step fuses runs of
//! element-wise ones), so the count per decode step is the figure that
//! fused projections and fused attention kernels lower (docs/PERF.md).
//!
//! `RMLX_COUNT_OPS=graph` also prints the graph itself.
//!
//! MLX prints a graph (`mlx_print_graph`) as its inputs, then one line per
//! primitive: `Name arrays -> arrays`; this counts those lines by name.
use anyhow::{bail, Result};
use mlx_rs::Array;
use std::collections::BTreeMap;
use std::io::{Read, Seek};

/// The primitives needed to evaluate `outputs`, by kind, in MLX's names.
pub fn count(outputs: &[&Array]) -> Result<OpCount> {
    let text = print_graph(outputs)?;
    if std::env::var("RMLX_COUNT_OPS").is_ok_and(|v| v == "graph") {
        eprintln!("{text}"); // RMLX_COUNT_OPS=graph: every primitive, in order
    }
    let mut by_kind = BTreeMap::new();
    for line in text.lines() {
        // "Add a1 a2 -> a3" — inputs are listed as bare names without "->".
        let Some((head, _)) = line.split_once(" -> ") else { continue };
        let name = head.split_whitespace().next().unwrap_or("");
        if name.is_empty() {
            continue;
        }
        *by_kind.entry(name.to_string()).or_insert(0usize) += 1;
    }
    Ok(OpCount { by_kind })
}

/// Primitives by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpCount {
    pub by_kind: BTreeMap<String, usize>,
}

impl OpCount {
    pub fn total(&self) -> usize {
        self.by_kind.values().sum()
    }
    /// Primitives whose name starts with `prefix` (e.g. "Matmul", "Gather").
    pub fn of(&self, prefix: &str) -> usize {
        self.by_kind.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, n)| n).sum()
    }
}

impl std::fmt::Display for OpCount {
    /// "612 ops: Matmul 141, Add 113, ..." (most frequent first).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kinds: Vec<_> = self.by_kind.iter().collect();
        kinds.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        write!(f, "{} ops:", self.total())?;
        for (i, (k, n)) in kinds.iter().enumerate() {
            write!(f, "{} {k} {n}", if i == 0 { "" } else { "," })?;
        }
        Ok(())
    }
}

/// MLX's text form of the graph behind `outputs`.
fn print_graph(outputs: &[&Array]) -> Result<String> {
    // SAFETY: the arrays outlive the calls; the vector, namer and FILE are
    // created and freed here; mlx_print_graph only reads the graph.
    unsafe {
        let file = libc::tmpfile();
        if file.is_null() {
            bail!("counting ops: no temporary file");
        }
        let raw: Vec<mlx_sys::mlx_array> = outputs.iter().map(|a| a.as_ptr()).collect();
        let vec = mlx_sys::mlx_vector_array_new_data(raw.as_ptr(), raw.len());
        let namer = mlx_sys::mlx_node_namer_new();
        let rc = mlx_sys::mlx_print_graph(file as *mut mlx_sys::FILE, namer, vec);
        mlx_sys::mlx_node_namer_free(namer);
        mlx_sys::mlx_vector_array_free(vec);
        libc::fflush(file);
        let fd = libc::dup(libc::fileno(file));
        libc::fclose(file);
        if rc != 0 || fd < 0 {
            if fd >= 0 {
                libc::close(fd);
            }
            bail!("counting ops: mlx_print_graph failed");
        }
        let mut f = <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd);
        f.rewind()?;
        let mut text = String::new();
        f.read_to_string(&mut text)?;
        Ok(text)
    }
}

/// Whether `RMLX_COUNT_OPS` asks for counts (read once: this is asked on
/// every decode step).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RMLX_COUNT_OPS").map(|v| v != "0" && !v.is_empty()).unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_primitives_of_a_small_graph() {
        let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2]);
        let b = a.matmul(&a).unwrap().add(&a).unwrap().exp().unwrap(); // Matmul, Add, Exp
        let c = count(&[&b]).unwrap();
        assert_eq!(c.total(), 3, "{c} from {:?}", c.by_kind);
        assert_eq!(c.of("Matmul"), 1);
        assert_eq!(c.of("Exp"), 1);
        // An evaluated array has no graph left.
        b.eval().unwrap();
        assert_eq!(count(&[&b]).unwrap().total(), 0);
    }
}
