//! The sandbox that runs model-written code and user scorer programs (Linux only).
//!
//! Owns: one child process per run with a wall-clock timeout, rlimits (CPU, address space, file
//! size, open files, process count), no network (a fresh network namespace), Landlock
//! filesystem confinement (read+exec on the system and interpreter folders only, read+write
//! only in a private temporary folder that is deleted afterwards), capped stdout/stderr, and a
//! guarantee that nothing it started outlives the run (no stray processes, no zombies).
//! Does not own: what the program is or how its outcome is scored (`code.rs`, `command.rs`).
//!
//! Process tree of one run:
//!
//! ```text
//! trainer ── supervisor (forked by std's Command, never execs; child subreaper)
//!               └── target (execs argv; everything it forks stays below the supervisor)
//! ```
//!
//! Why a supervisor: orphans are re-parented to the nearest subreaper, and PID 1 on our
//! machines does not reap, so without one every killed grandchild would stay a zombie. The
//! supervisor reaps the whole subtree, kills the rest when the target exits or when the
//! trainer asks (SIGUSR1), and exits with the target's status.
//!
//! Privileges. As root (our machines and CI) each run gets two fresh uids: the target runs as
//! uid X, the supervisor as (real Y, effective X). RLIMIT_NPROC then really applies (the kernel
//! exempts uid 0), `kill(-1)` from the supervisor reaches exactly the processes of uid X (also
//! those that called `setsid`), and the sandbox cannot signal its supervisor (uid Y). When an
//! allowed folder is not reachable by "others" (the pyenv python under a 0700 /root), the
//! target keeps CAP_DAC_READ_SEARCH as an ambient capability so it can read and traverse; what
//! it may read is then decided by Landlock alone. Without root: a user namespace + network
//! namespace, the process group is killed instead of the uid, and RLIMIT_NPROC counts all of
//! the user's processes (weaker; documented, not used on our machines).
//!
//! Fail closed: no Landlock (kernel < 5.13 or disabled) or no namespace ⇒ `SandboxError`, never
//! an unconfined run. Known gaps: pathname unix sockets that are world-writable can still be
//! connected to (Landlock ABI < 9 does not cover `connect` on them); a program that reads its
//! own source can see whatever that source contains.

mod landlock;

use std::ffi::{OsStr, OsString};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Folders every program needs to start (dynamic loader, libc, locale, time zone).
const SYSTEM_READ: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache",
    "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives",
    "/dev/urandom", "/dev/random", "/dev/zero",
];

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox unavailable: {0}")]
    Unsupported(String),
    #[error("sandbox: {what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("python interpreter `{python}`: {reason}")]
    Python { python: String, reason: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Io { what, source }
}

/// Limits of one run. `Default` suits a HumanEval-sized test program.
#[derive(Clone, Debug)]
pub struct SandboxSpec {
    /// Wall-clock limit; then every process of the run is SIGKILLed.
    pub timeout: Duration,
    /// RLIMIT_AS of the target, MiB.
    pub memory_mb: u64,
    /// RLIMIT_NPROC: processes + threads of the run (root mode: per fresh uid).
    pub max_procs: u64,
    /// RLIMIT_FSIZE, MiB: largest file the program may write.
    pub max_file_mb: u64,
    /// RLIMIT_NOFILE.
    pub max_open_files: u64,
    /// Bytes kept of stdout and of stderr each; more output kills the run (`End::OutputLimit`).
    pub output_cap: usize,
    /// Extra files/folders the program may read and execute (the interpreter's prefix, a user's
    /// scorer script). Must exist.
    pub read_paths: Vec<PathBuf>,
}

impl Default for SandboxSpec {
    fn default() -> Self {
        SandboxSpec {
            timeout: Duration::from_secs(5),
            memory_mb: 512,
            max_procs: 16,
            max_file_mb: 16,
            max_open_files: 64,
            output_cap: 1 << 20,
            read_paths: Vec::new(),
        }
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Exited(i32),
    /// Killed by this signal (not by us).
    Signaled(i32),
    /// Past the wall-clock limit; killed.
    Timeout,
    /// SIGXCPU: past RLIMIT_CPU.
    CpuLimit,
    /// Non-zero exit with `MemoryError` / `Cannot allocate memory` on stderr (a heuristic:
    /// RLIMIT_AS makes allocations fail, it does not kill).
    MemoryLimit,
    /// stdout or stderr passed `output_cap`; killed.
    OutputLimit,
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub end: End,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub wall: Duration,
    /// The fresh uid the program ran as (root mode), for leak checks: after `run` returns no
    /// process of this uid exists.
    pub uid: Option<u32>,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.end == End::Exited(0)
    }
    /// A one-line reason for logs: the end and the last stderr line.
    pub fn reason(&self) -> String {
        let err = String::from_utf8_lossy(&self.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        let last: String = last.chars().take(200).collect();
        format!("{:?} after {:.2}s{}", self.end, self.wall.as_secs_f64(), if last.is_empty() { String::new() } else { format!(": {last}") })
    }
}

/// The real interpreter behind a `python3` command (pyenv shims are bash scripts that would
/// need half of $PYENV_ROOT) and the folders it reads.
#[derive(Clone, Debug)]
pub struct PythonInfo {
    pub executable: PathBuf,
    pub roots: Vec<PathBuf>,
}

/// Ask `python` (a name on PATH or a path) for `sys.executable` and its prefixes. Runs it
/// unsandboxed: it is the user's configured interpreter, not model output. Cached per process
/// (a pyenv shim takes ~0.4 s to answer).
pub fn resolve_python(python: &str) -> Result<PythonInfo, SandboxError> {
    static CACHE: std::sync::Mutex<Vec<(String, PythonInfo)>> = std::sync::Mutex::new(Vec::new());
    if let Some((_, info)) = CACHE.lock().ok().and_then(|c| c.iter().find(|(k, _)| k == python).cloned()) {
        return Ok(info);
    }
    let info = query_python(python)?;
    if let Ok(mut c) = CACHE.lock() {
        c.push((python.to_string(), info.clone()));
    }
    Ok(info)
}

fn query_python(python: &str) -> Result<PythonInfo, SandboxError> {
    let perr = |reason: String| SandboxError::Python { python: python.to_string(), reason };
    let script = "import sys, json; print(json.dumps([sys.executable, sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]))";
    let out = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| perr(format!("cannot run it: {e}")))?;
    if !out.status.success() {
        return Err(perr(format!("exited with {}", out.status)));
    }
    let paths: Vec<String> = serde_json::from_slice(&out.stdout)
        .map_err(|e| perr(format!("unexpected answer to sys.executable query: {e}")))?;
    let canon = |p: &str| std::fs::canonicalize(p).map_err(|e| perr(format!("{p}: {e}")));
    let executable = canon(paths.first().map(String::as_str).unwrap_or(""))?;
    let mut roots = Vec::new();
    if let Some(dir) = executable.parent() {
        roots.push(dir.to_path_buf());
    }
    for p in &paths[1..] {
        let c = canon(p)?;
        if !roots.contains(&c) {
            roots.push(c);
        }
    }
    Ok(PythonInfo { executable, roots })
}

pub struct Sandbox {
    spec: SandboxSpec,
    abi: u32,
    privileged: bool,
    dac_bypass: bool,
    read_roots: Vec<PathBuf>,
}

impl Sandbox {
    /// Check that the kernel can confine a run (fails closed) and fix the allowed folders.
    pub fn new(spec: SandboxSpec) -> Result<Self, SandboxError> {
        let abi = landlock::abi_version();
        if abi == 0 {
            return Err(SandboxError::Unsupported(
                "Landlock is not available (needs Linux >= 5.13 with landlock in lsm=); refusing to run code without filesystem confinement".into(),
            ));
        }
        // SAFETY: geteuid cannot fail.
        let privileged = unsafe { libc::geteuid() } == 0;
        let mut read_roots: Vec<PathBuf> = SYSTEM_READ.iter().map(PathBuf::from).collect();
        let mut dac_bypass = false;
        for p in &spec.read_paths {
            let c = std::fs::canonicalize(p).map_err(io_err(format!("read path {}", p.display())))?;
            dac_bypass |= !reachable_by_others(&c, true);
            read_roots.push(c);
        }
        dac_bypass |= !reachable_by_others(&std::env::temp_dir(), false);
        Ok(Sandbox { spec, abi, privileged, dac_bypass: dac_bypass && privileged, read_roots })
    }

    pub fn spec(&self) -> &SandboxSpec {
        &self.spec
    }

    /// Run `argv` (argv[0] an absolute path) in a fresh private folder holding `files`
    /// (name → content), feeding `stdin`. Err only when the sandbox itself failed; everything
    /// the program does is in `Outcome`.
    pub fn run(&self, argv: &[OsString], stdin: &[u8], files: &[(&str, &[u8])]) -> Result<Outcome, SandboxError> {
        let start = Instant::now();
        let Some(program) = argv.first() else {
            return Err(SandboxError::Unsupported("empty command".into()));
        };
        let (uid_x, uid_y) = fresh_uids();
        let dir = PrivateDir::create(self.privileged.then_some(uid_x))?;
        for (name, data) in files {
            if name.is_empty() || name.contains('/') || *name == ".." || *name == "." {
                return Err(SandboxError::Unsupported(format!("bad file name {name:?}")));
            }
            let path = dir.path.join(name);
            std::fs::write(&path, data).map_err(io_err(format!("write {}", path.display())))?;
            if self.privileged {
                std::os::unix::fs::chown(&path, Some(uid_x), Some(uid_x)).map_err(io_err("chown sandbox file"))?;
            }
        }
        let mut rules = landlock::Ruleset::new(self.abi).map_err(io_err("landlock ruleset"))?;
        for root in &self.read_roots {
            rules.allow(root, landlock::Access::ReadExec).map_err(io_err(format!("landlock rule {}", root.display())))?;
        }
        rules.allow(Path::new("/dev/null"), landlock::Access::ReadWriteFile).map_err(io_err("landlock rule /dev/null"))?;
        rules.allow(&dir.path, landlock::Access::Full).map_err(io_err("landlock rule for the private folder"))?;

        let limits = [
            (libc::RLIMIT_CPU, cpu_seconds(self.spec.timeout), cpu_seconds(self.spec.timeout) + 1),
            (libc::RLIMIT_AS, self.spec.memory_mb << 20, self.spec.memory_mb << 20),
            (libc::RLIMIT_FSIZE, self.spec.max_file_mb << 20, self.spec.max_file_mb << 20),
            (libc::RLIMIT_NOFILE, self.spec.max_open_files, self.spec.max_open_files),
            (libc::RLIMIT_NPROC, self.spec.max_procs, self.spec.max_procs),
        ];
        let cfg = ChildCfg {
            privileged: self.privileged,
            dac_bypass: self.dac_bypass,
            uid_x,
            uid_y,
            limits,
            ruleset_fd: rules.raw_fd(),
        };
        let mut cmd = Command::new(program);
        cmd.args(&argv[1..])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", &dir.path)
            .env("TMPDIR", &dir.path)
            .env("LANG", "C.UTF-8")
            .env("PYTHONHASHSEED", "0")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONNOUSERSITE", "1")
            // One thread per BLAS/OpenMP pool: threads count against max_procs.
            .env("OMP_NUM_THREADS", "1")
            .env("OPENBLAS_NUM_THREADS", "1")
            .env("MKL_NUM_THREADS", "1")
            .current_dir(&dir.path)
            .stdin(if stdin.is_empty() { Stdio::null() } else { Stdio::piped() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: child_setup only makes async-signal-safe syscalls on data copied before fork.
        unsafe {
            cmd.pre_exec(move || child_setup(&cfg));
        }
        let mut child = cmd.spawn().map_err(io_err(format!("start {}", Path::new(program).display())))?;
        drop(rules);
        let sup = child.id() as libc::pid_t;
        let stdin_pipe = child.stdin.take();
        let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(SandboxError::Unsupported("child pipes missing".into()));
        };
        let watched = watch(sup, out, err, stdin_pipe, stdin, &self.spec);
        // Always reap the supervisor, even when watching failed.
        let status = child.wait().map_err(io_err("wait for the sandbox"))?;
        let (stdout, stderr, killed) = watched?;
        let wall = start.elapsed();
        let end = match killed {
            Some(e) => e,
            None => classify(status, &stderr),
        };
        Ok(Outcome { end, stdout, stderr, wall, uid: self.privileged.then_some(uid_x) })
    }
}

fn cpu_seconds(t: Duration) -> u64 {
    t.as_secs() + 1 + u64::from(t.subsec_nanos() > 0)
}

fn classify(status: std::process::ExitStatus, stderr: &[u8]) -> End {
    if let Some(code) = status.code() {
        let text = String::from_utf8_lossy(stderr);
        if code != 0 && (text.contains("MemoryError") || text.contains("Cannot allocate memory")) {
            return End::MemoryLimit;
        }
        return End::Exited(code);
    }
    match status.signal() {
        Some(libc::SIGXCPU) => End::CpuLimit,
        Some(s) => End::Signaled(s),
        None => End::Signaled(0),
    }
}

/// Is `path` readable by "others" through every ancestor (so a fresh uid can reach it)?
fn reachable_by_others(path: &Path, need_read: bool) -> bool {
    let ok_dir = |p: &Path| std::fs::metadata(p).map(|m| m.mode() & 0o001 != 0).unwrap_or(false);
    if !path.ancestors().skip(1).all(ok_dir) {
        return false;
    }
    match std::fs::metadata(path) {
        Ok(m) if need_read => m.mode() & 0o004 != 0 && (!m.is_dir() || m.mode() & 0o001 != 0),
        Ok(m) => m.mode() & 0o001 != 0,
        Err(_) => false,
    }
}

/// Two fresh uids per run, unlikely to collide across trainer processes.
fn fresh_uids() -> (u32, u32) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % 2000;
    let x = 1_000_000 + (std::process::id() % 4000) * 4000 + n * 2;
    (x, x + 1)
}

/// The private folder (cwd, HOME, TMPDIR of the run), removed on drop.
struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    fn create(owner: Option<u32>) -> Result<Self, SandboxError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let name = format!("ferrotune-sandbox-{}-{}-{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        std::fs::DirBuilder::new().mode(0o700).create(&path).map_err(io_err(format!("create {}", path.display())))?;
        let dir = PrivateDir { path };
        if let Some(uid) = owner {
            std::os::unix::fs::chown(&dir.path, Some(uid), Some(uid)).map_err(io_err("chown the private folder"))?;
        }
        Ok(dir)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        // The program may have removed its own permissions; we are its owner (or root).
        let _ = std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o700));
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

type Watched = (Vec<u8>, Vec<u8>, Option<End>);

/// Pump stdout/stderr (capped), feed stdin from a thread, enforce the wall-clock limit, and
/// return once the supervisor has exited and both pipes are closed.
fn watch(
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
        return Err(SandboxError::Io { what: "pidfd_open".into(), source: e });
    }
    // SAFETY: fresh fd from the kernel.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pfd as RawFd) };
    for fd in [out.as_raw_fd(), err.as_raw_fd()] {
        // SAFETY: fcntl on fds we own.
        unsafe { libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK) };
    }
    std::thread::scope(|s| {
        if let Some(mut pipe) = stdin_pipe {
            // A program that never reads its stdin must not block us: write from a thread;
            // it ends with EPIPE once the program is gone.
            s.spawn(move || {
                let _ = pipe.write_all(stdin);
            });
        }
        let mut streams = [(Some(out.as_raw_fd()), Vec::new()), (Some(err.as_raw_fd()), Vec::new())];
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
                    fds.push(libc::pollfd { fd: *fd, events: libc::POLLIN, revents: 0 });
                }
            }
            if !exited {
                fds.push(libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            }
            // SAFETY: fds is a valid array of pollfd.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                request_kill(sup, true);
                return Err(SandboxError::Io { what: "poll".into(), source: e });
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
                let Some((slot, data)) = streams.iter_mut().find(|(fd, _)| *fd == Some(p.fd)) else { continue };
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
                    if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
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

// ---------------------------------------------------------------------------------------------
// Between fork and exec: async-signal-safe code only (syscalls on values copied before fork).

#[derive(Clone, Copy)]
struct ChildCfg {
    privileged: bool,
    dac_bypass: bool,
    uid_x: u32,
    uid_y: u32,
    limits: [(libc::__rlimit_resource_t, u64, u64); 5],
    ruleset_fd: RawFd,
}

const CAP_DAC_READ_SEARCH: u32 = 2;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn capset(mask: u32) -> io::Result<()> {
    let mut hdr = CapHeader { version: 0x2008_0522, pid: 0 };
    let data = [CapData { effective: mask, permitted: mask, inheritable: mask }, CapData { effective: 0, permitted: 0, inheritable: 0 }];
    // SAFETY: v3 header with two data words, as the ABI requires.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) } as libc::c_int)
}

fn setrlimit(res: libc::__rlimit_resource_t, soft: u64, hard: u64) -> io::Result<()> {
    let lim = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: plain syscall.
    check(unsafe { libc::setrlimit(res, &lim) })
}

fn child_setup(cfg: &ChildCfg) -> io::Result<()> {
    // SAFETY (whole function): only syscalls, no allocation, no locks.
    unsafe {
        let flags = if cfg.privileged { libc::CLONE_NEWNET } else { libc::CLONE_NEWUSER | libc::CLONE_NEWNET };
        check(libc::unshare(flags))?;
        check(libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0))?;
        setrlimit(libc::RLIMIT_CORE, 0, 0)?;
        if cfg.privileged {
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(cfg.uid_x, cfg.uid_x, cfg.uid_x))?;
            if cfg.dac_bypass {
                check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0))?;
            }
            // Supervisor credentials: can kill uid X, cannot be signalled by it.
            check(libc::setresuid(cfg.uid_y, cfg.uid_x, cfg.uid_y))?;
        }
        let sup = libc::getpid();
        let pid = libc::fork();
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid > 0 {
            supervise(pid, cfg.privileged);
        }
        // Target.
        check(libc::setpgid(0, 0))?;
        if cfg.privileged {
            check(libc::setresuid(cfg.uid_x, cfg.uid_x, cfg.uid_x))?;
            if cfg.dac_bypass {
                capset(1 << CAP_DAC_READ_SEARCH)?;
                check(libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong, CAP_DAC_READ_SEARCH as libc::c_ulong, 0, 0))?;
            }
        }
        // After the credential change (which clears it).
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
        if libc::getppid() != sup {
            libc::_exit(125);
        }
        for (res, soft, hard) in cfg.limits {
            setrlimit(res, soft, hard)?;
        }
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        landlock::restrict_self(cfg.ruleset_fd)?;
    }
    Ok(())
}

static KILL_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_kill_request(_: libc::c_int) {
    KILL_REQUESTED.store(true, Ordering::SeqCst);
}

/// The supervisor: reap the subtree, kill it when the target ends or on SIGUSR1, exit with the
/// target's status. Never returns.
fn supervise(target: libc::pid_t, privileged: bool) -> ! {
    // SAFETY (whole function): only syscalls in a single-threaded forked child.
    unsafe {
        let _ = capset(0);
        // Close the pipes (and std's exec-error pipe) so the trainer sees EOF as soon as the
        // sandboxed processes are gone.
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kill_request as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        let mut target_status: Option<libc::c_int> = None;
        let mut killing = false;
        let mut rounds = 0u32;
        loop {
            if KILL_REQUESTED.load(Ordering::SeqCst) {
                killing = true;
            }
            if killing {
                kill_all(target, privileged);
            }
            let mut st = 0;
            let opts = if killing { libc::__WALL | libc::WNOHANG } else { libc::__WALL };
            let r = libc::waitpid(-1, &mut st, opts);
            if r > 0 {
                if r == target {
                    target_status = Some(st);
                    killing = true;
                }
                continue;
            }
            if r == 0 {
                // Still children after a kill: give the kernel a moment, then kill again.
                // Bounded so a process in uninterruptible sleep cannot hold us forever.
                rounds += 1;
                if rounds > 5000 {
                    break;
                }
                let ts = libc::timespec { tv_sec: 0, tv_nsec: 1_000_000 };
                libc::nanosleep(&ts, std::ptr::null_mut());
                continue;
            }
            if *libc::__errno_location() == libc::EINTR {
                continue;
            }
            break; // ECHILD: the whole subtree is gone.
        }
        match target_status {
            Some(st) if libc::WIFEXITED(st) => libc::_exit(libc::WEXITSTATUS(st)),
            Some(st) if libc::WIFSIGNALED(st) => {
                let sig = libc::WTERMSIG(st);
                libc::signal(sig, libc::SIG_DFL);
                libc::kill(libc::getpid(), sig);
                libc::_exit(128 + sig)
            }
            _ => libc::_exit(125),
        }
    }
}

/// Root mode: every process of uid X (wherever it moved its process group). Otherwise: the
/// target's process group.
unsafe fn kill_all(target: libc::pid_t, privileged: bool) {
    if privileged {
        libc::kill(-1, libc::SIGKILL);
    } else {
        libc::kill(-target, libc::SIGKILL);
        libc::kill(target, libc::SIGKILL);
    }
}

/// For callers that want to pass a command line as strings.
pub fn argv<I, S>(items: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    items.into_iter().map(|s| s.as_ref().to_os_string()).collect()
}
