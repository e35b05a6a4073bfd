//! Watching one sandbox run from the trainer's side.
//!
//! Owns: pumping stdout/stderr with a cap, feeding stdin, the wall-clock deadline, and asking
//! the supervisor to kill the run. Does not own: the process setup (`child.rs`) or the outcome's
//! meaning (`sandbox.rs`).

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use super::{End, SandboxError, SandboxSpec};

pub(super) type Watched = (Vec<u8>, Vec<u8>, Option<End>);

/// Pump stdout/stderr (capped), feed stdin from a thread, enforce the wall-clock limit, and
/// return once the supervisor has exited and both pipes are closed.
pub(super) fn watch(
    sup: libc::pid_t,
    out: std::process::ChildStdout,
    err: std::process::ChildStderr,
    stdin_pipe: Option<std::process::ChildStdin>,
    stdin: &[u8],
    spec: &SandboxSpec,
) -> Result<Watched, SandboxError> {
    // SAFETY: pidfd_open on our own unreaped child.
    let pfd = unsafe { libc::syscall(libc::SYS_pidfd_open, sup, 0) };
    if pfd < 0 {
        let e = io::Error::last_os_error();
        request_kill(sup, true);
        return Err(SandboxError::Io {
            what: "pidfd_open".into(),
            source: e,
        });
    }
    // SAFETY: fresh fd from the kernel.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pfd as RawFd) };
    for fd in [out.as_raw_fd(), err.as_raw_fd()] {
        // SAFETY: fcntl on fds we own.
        unsafe {
            libc::fcntl(
                fd,
                libc::F_SETFL,
                libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
            )
        };
    }
    std::thread::scope(|s| {
        if let Some(mut pipe) = stdin_pipe {
            // A program that never reads its stdin must not block us: write from a thread;
            // it ends with EPIPE once the program is gone.
            s.spawn(move || {
                let _ = pipe.write_all(stdin);
            });
        }
        let mut streams = [
            (Some(out.as_raw_fd()), Vec::new()),
            (Some(err.as_raw_fd()), Vec::new()),
        ];
        let mut exited = false;
        let mut killed: Option<End> = None;
        let deadline = Instant::now() + spec.timeout;
        let mut give_up: Option<Instant> = None; // after exit/kill: how long we still wait
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if exited && streams.iter().all(|(fd, _)| fd.is_none()) {
                break;
            }
            let now = Instant::now();
            if let Some(g) = give_up {
                if now >= g {
                    // Last resort: the supervisor did not finish; kill it (pdeathsig takes
                    // its target) and stop reading.
                    // SAFETY: signalling our own child, unreaped, so its pid is still ours.
                    unsafe { libc::kill(sup, libc::SIGKILL) };
                    break;
                }
            }
            let mut wait_ms = match (killed.is_some(), give_up) {
                (true, _) => 20, // re-send the kill request until the supervisor is gone
                (false, Some(g)) => g.saturating_duration_since(now).as_millis() as i32 + 1,
                (false, None) => deadline.saturating_duration_since(now).as_millis() as i32 + 1,
            };
            wait_ms = wait_ms.max(1);
            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(3);
            for (fd, _) in &streams {
                if let Some(fd) = fd {
                    fds.push(libc::pollfd {
                        fd: *fd,
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
            }
            if !exited {
                fds.push(libc::pollfd {
                    fd: pidfd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            // SAFETY: fds is a valid array of pollfd.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                request_kill(sup, true);
                return Err(SandboxError::Io {
                    what: "poll".into(),
                    source: e,
                });
            }
            for p in &fds {
                if p.revents == 0 {
                    continue;
                }
                if p.fd == pidfd.as_raw_fd() {
                    exited = true;
                    give_up.get_or_insert(Instant::now() + Duration::from_secs(2));
                    continue;
                }
                let Some((slot, data)) = streams.iter_mut().find(|(fd, _)| *fd == Some(p.fd))
                else {
                    continue;
                };
                // SAFETY: reading into our buffer from an fd we own.
                let r = unsafe { libc::read(p.fd, buf.as_mut_ptr().cast(), buf.len()) };
                if r > 0 {
                    let r = r as usize;
                    let room = spec.output_cap.saturating_sub(data.len());
                    data.extend_from_slice(&buf[..r.min(room)]);
                    if r > room && killed.is_none() {
                        killed = Some(End::OutputLimit);
                        give_up = Some(Instant::now() + Duration::from_secs(2));
                    }
                } else if r == 0 {
                    *slot = None;
                } else {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::WouldBlock
                        && e.kind() != io::ErrorKind::Interrupted
                    {
                        *slot = None;
                    }
                }
            }
            if killed.is_none() && !exited && Instant::now() >= deadline {
                killed = Some(End::Timeout);
                give_up = Some(Instant::now() + Duration::from_secs(2));
            }
            if killed.is_some() && !exited {
                request_kill(sup, false);
            }
        }
        let [(_, o), (_, e)] = streams;
        Ok((o, e, killed))
    })
}

/// Ask the supervisor to kill everything of this run (SIGUSR1); `hard` kills the supervisor
/// itself (its target dies by pdeathsig) for when we cannot wait.
fn request_kill(sup: libc::pid_t, hard: bool) {
    // SAFETY: signalling our own unreaped child.
    unsafe { libc::kill(sup, if hard { libc::SIGKILL } else { libc::SIGUSR1 }) };
}
