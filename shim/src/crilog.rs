//! The CRI log format: every line is
//! `<RFC3339Nano UTC> <stdout|stderr> <F|P> <content>\n`.
//!
//! A line longer than [`MAX_LINE`] bytes is split into `P` (partial) chunks
//! of exactly [`MAX_LINE`] bytes followed by the remainder tagged `F`; a
//! partial last line (no trailing newline at EOF) is written with `P`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::timefmt::{TIMESTAMP_LEN, format_rfc3339_nanos};

/// Longest content of one log record.
pub const MAX_LINE: usize = 16 * 1024;

/// Which stream a record comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamName {
    Stdout,
    Stderr,
}

impl StreamName {
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            StreamName::Stdout => b"stdout",
            StreamName::Stderr => b"stderr",
        }
    }
}

/// Splits one stream's bytes into CRI log records. Holds at most
/// [`MAX_LINE`] bytes of an unfinished line.
#[derive(Debug)]
pub struct LineSplitter {
    name: StreamName,
    partial: Vec<u8>,
}

impl LineSplitter {
    pub fn new(name: StreamName) -> Self {
        LineSplitter {
            name,
            partial: Vec::new(),
        }
    }

    /// Appends to `out` the records completed by `data`, stamped `ts`.
    pub fn feed(&mut self, data: &[u8], ts: &[u8; TIMESTAMP_LEN], out: &mut Vec<u8>) {
        let mut rest = data;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let line = &rest[..i];
            if self.partial.is_empty() {
                self.emit_full(line, ts, out);
            } else {
                let mut joined = std::mem::take(&mut self.partial);
                joined.extend_from_slice(line);
                self.emit_full(&joined, ts, out);
                joined.clear();
                self.partial = joined;
            }
            rest = &rest[i + 1..];
        }
        if rest.is_empty() {
            return;
        }
        // No newline in what is left: emit full-size chunks only while more
        // bytes of the same line are known to follow.
        if self.partial.is_empty() {
            while rest.len() > MAX_LINE {
                self.record(b'P', &rest[..MAX_LINE], ts, out);
                rest = &rest[MAX_LINE..];
            }
            self.partial.extend_from_slice(rest);
        } else {
            self.partial.extend_from_slice(rest);
            let mut start = 0;
            while self.partial.len() - start > MAX_LINE {
                record(
                    out,
                    ts,
                    self.name,
                    b'P',
                    &self.partial[start..start + MAX_LINE],
                );
                start += MAX_LINE;
            }
            self.partial.drain(..start);
        }
        if self.partial.capacity() > 2 * MAX_LINE {
            self.partial.shrink_to(MAX_LINE);
        }
    }

    /// The stream ended: a pending partial line is written with `P`.
    pub fn finish(&mut self, ts: &[u8; TIMESTAMP_LEN], out: &mut Vec<u8>) {
        if !self.partial.is_empty() {
            let partial = std::mem::take(&mut self.partial);
            self.record(b'P', &partial, ts, out);
        }
    }

    /// Bytes of an unfinished line held.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }

    fn emit_full(&self, mut line: &[u8], ts: &[u8; TIMESTAMP_LEN], out: &mut Vec<u8>) {
        while line.len() > MAX_LINE {
            self.record(b'P', &line[..MAX_LINE], ts, out);
            line = &line[MAX_LINE..];
        }
        self.record(b'F', line, ts, out);
    }

    fn record(&self, tag: u8, content: &[u8], ts: &[u8; TIMESTAMP_LEN], out: &mut Vec<u8>) {
        record(out, ts, self.name, tag, content);
    }
}

fn record(out: &mut Vec<u8>, ts: &[u8; TIMESTAMP_LEN], name: StreamName, tag: u8, content: &[u8]) {
    out.reserve(TIMESTAMP_LEN + 10 + content.len());
    out.extend_from_slice(ts);
    out.push(b' ');
    out.extend_from_slice(name.as_bytes());
    out.push(b' ');
    out.push(tag);
    out.push(b' ');
    out.extend_from_slice(content);
    out.push(b'\n');
}

/// Current time as a CRI timestamp.
pub fn timestamp_now() -> [u8; TIMESTAMP_LEN] {
    let mut ts = [0u8; TIMESTAMP_LEN];
    format_rfc3339_nanos(crate::timefmt::now_nanos(), &mut ts);
    ts
}

/// The CRI log file: appended to directly (never through berthd), reopened
/// under the same path after kubelet rotated it. Without a path, output is
/// discarded.
#[derive(Debug)]
pub struct LogFile {
    path: Option<PathBuf>,
    file: Option<File>,
}

impl LogFile {
    pub fn open(path: Option<PathBuf>) -> io::Result<Self> {
        let file = match &path {
            Some(p) => Some(open_log(p)?),
            None => None,
        };
        Ok(LogFile { path, file })
    }

    /// Writes records (whole lines only, so a reopen never splits a line).
    pub fn write(&mut self, records: &[u8]) -> io::Result<()> {
        match &mut self.file {
            Some(f) if !records.is_empty() => f.write_all(records),
            _ => Ok(()),
        }
    }

    /// Opens the path again (a new file if it was renamed away); on failure
    /// the old file stays in use.
    pub fn reopen(&mut self) -> io::Result<()> {
        if let Some(p) = &self.path {
            let new = open_log(p)?;
            self.file = Some(new);
        }
        Ok(())
    }
}

fn open_log(path: &std::path::Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TS: &[u8; TIMESTAMP_LEN] = b"2016-10-06T00:17:09.669794202Z";

    fn run(name: StreamName, chunks: &[&[u8]], eof: bool) -> Vec<String> {
        let mut s = LineSplitter::new(name);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, TS, &mut out);
        }
        if eof {
            s.finish(TS, &mut out);
        }
        let text = String::from_utf8(out).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'));
        text.lines()
            .map(|l| l[TIMESTAMP_LEN + 1..].to_owned())
            .collect()
    }

    #[test]
    fn full_lines_across_chunks() {
        assert_eq!(
            run(StreamName::Stdout, &[b"hel", b"lo\nwor", b"ld\n\n"], true),
            vec!["stdout F hello", "stdout F world", "stdout F "]
        );
    }

    #[test]
    fn partial_last_line_is_tagged_p() {
        assert_eq!(
            run(StreamName::Stderr, &[b"a\nno newline"], true),
            vec!["stderr F a", "stderr P no newline"]
        );
        assert_eq!(
            run(StreamName::Stderr, &[b"x"], false),
            Vec::<String>::new()
        );
    }

    #[test]
    fn long_line_is_split_into_16k_chunks() {
        let line = vec![b'y'; 40 * 1024];
        let mut input = line.clone();
        input.push(b'\n');
        for chunking in [input.len(), 4096, 1000, 16384, 16385] {
            let chunks: Vec<&[u8]> = input.chunks(chunking).collect();
            let out = run(StreamName::Stdout, &chunks, true);
            let tags: Vec<&str> = out.iter().map(|l| &l[..8]).collect();
            assert_eq!(tags, vec!["stdout P", "stdout P", "stdout F"], "{chunking}");
            let lens: Vec<usize> = out.iter().map(|l| l.len() - 9).collect();
            assert_eq!(lens, vec![16384, 16384, 40 * 1024 - 32768]);
        }
    }

    #[test]
    fn exactly_max_line_is_one_full_record() {
        let mut input = vec![b'z'; MAX_LINE];
        input.push(b'\n');
        let out = run(StreamName::Stdout, &[&input[..100], &input[100..]], true);
        assert_eq!(out.len(), 1);
        assert!(out[0].starts_with("stdout F zzz"));
    }

    #[test]
    fn long_partial_at_eof() {
        let input = vec![b'q'; MAX_LINE + 5];
        let out = run(StreamName::Stdout, &[&input], true);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len(), 9 + MAX_LINE);
        assert_eq!(out[1], "stdout P qqqqq");
    }

    #[test]
    fn record_format() {
        let mut s = LineSplitter::new(StreamName::Stdout);
        let mut out = Vec::new();
        s.feed(b"hello\n", TS, &mut out);
        assert_eq!(out, b"2016-10-06T00:17:09.669794202Z stdout F hello\n");
    }

    #[test]
    fn reopen_follows_a_rename() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut log = LogFile::open(Some(path.clone())).unwrap();
        log.write(b"one\n").unwrap();
        std::fs::rename(&path, dir.path().join("0.log.1")).unwrap();
        log.write(b"two\n").unwrap();
        log.reopen().unwrap();
        log.write(b"three\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("0.log.1")).unwrap(),
            "one\ntwo\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");
    }
}
