//! Serial console plumbing: where guest output goes and where input comes from.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use vmm::inputs::HostInputs;
use vmm::output::{ConsoleWriter, Output, OutputSink, Tag};

/// A console sink that keeps everything the guest wrote to its console
/// (tests, benches); frames are dropped.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    /// An empty capture.
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        self.0
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Everything written so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.lock() {
            Ok(mut b) => {
                b.extend_from_slice(buf);
                Ok(buf.len())
            }
            Err(_) => Err(std::io::Error::other("capture lock poisoned")),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl OutputSink for Capture {
    fn put(&mut self, output: Output, tag: Tag) {
        ConsoleWriter(self).put(output, tag);
    }
}

/// Guest output to this process's stdout, flushed per write so the console
/// is interactive; frames are dropped.
pub struct Stdout;

impl OutputSink for Stdout {
    fn put(&mut self, output: Output, tag: Tag) {
        ConsoleWriter(self).put(output, tag);
    }
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// Forward this process's stdin to the guest's serial port, from a thread.
pub fn forward_stdin(inputs: HostInputs) {
    let spawned = std::thread::Builder::new()
        .name("ftvmm-stdin".into())
        .spawn(move || {
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin().lock();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        // A full queue drops the rest, as a UART overruns.
                        inputs.push_serial(&buf[..n]);
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no serial input: cannot start the stdin thread: {e}");
    }
}
