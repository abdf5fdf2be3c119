//! A reader that turns every line end into LF: CRLF (Windows) and a lone CR (classic Mac, still
//! written by Excel's "CSV (Macintosh)").
//!
//! The csv crate counts lines only at LF, and with CRLF it starts the next row's count before
//! that LF: every problem in a Windows file would be reported one line early, and in a classic
//! Mac file on line 1. Reading through this adapter gives the right line numbers. A CR inside a
//! quoted field becomes LF too: either way it is a line break.

use std::io::{self, Read};

pub struct LineEndsAsLf<R> {
    inner: R,
    buffer: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
}

impl<R: Read> LineEndsAsLf<R> {
    pub fn new(inner: R) -> Self {
        LineEndsAsLf {
            inner,
            buffer: vec![0; 1 << 16].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
        }
    }

    /// Moves what is left to the front and reads more after it.
    fn refill(&mut self) -> io::Result<()> {
        self.buffer.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        let read = loop {
            match self.inner.read(&mut self.buffer[self.end..]) {
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                other => break other?,
            }
        };
        if read == 0 {
            self.eof = true;
        }
        self.end += read;
        Ok(())
    }
}

impl<R: Read> Read for LineEndsAsLf<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            let mut written = 0;
            while written < out.len() && self.start < self.end {
                let byte = self.buffer[self.start];
                if byte == b'\r' {
                    // Whether it is lone depends on the next byte, which may not be read yet.
                    if self.start + 1 == self.end && !self.eof {
                        break;
                    }
                    let before_lf =
                        self.start + 1 < self.end && self.buffer[self.start + 1] == b'\n';
                    self.start += 1;
                    if before_lf {
                        // The LF that follows is the line end.
                        continue;
                    }
                    out[written] = b'\n';
                } else {
                    out[written] = byte;
                    self.start += 1;
                }
                written += 1;
            }
            if written > 0 || (self.eof && self.start == self.end) {
                return Ok(written);
            }
            self.refill()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads everything through the adapter, `chunk` bytes at a time from the source.
    fn check(input: &[u8], expected: &[u8]) {
        for chunk in [1, 2, 3, 7, 1 << 16] {
            struct Chunked<'a>(&'a [u8], usize);
            impl Read for Chunked<'_> {
                fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                    let n = self.0.len().min(self.1).min(out.len());
                    out[..n].copy_from_slice(&self.0[..n]);
                    self.0 = &self.0[n..];
                    Ok(n)
                }
            }
            let mut got = Vec::new();
            LineEndsAsLf::new(Chunked(input, chunk))
                .read_to_end(&mut got)
                .unwrap();
            assert_eq!(got, expected, "chunk {chunk}");
        }
    }

    #[test]
    fn every_line_end_becomes_lf() {
        check(b"a\rb\r\nc\nd\r", b"a\nb\nc\nd\n");
        check(b"\r\r\n\r", b"\n\n\n");
        check(b"\r\n\r\n", b"\n\n");
        check(b"", b"");
        check(b"no line ends", b"no line ends");
    }
}
