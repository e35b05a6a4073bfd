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
//!               └── target = PID 1 of a fresh PID namespace (execs argv; all it forks stays
//!                   inside that namespace and below the supervisor)
//! ```
//!
//! Why a supervisor: orphans are re-parented to the nearest subreaper, and PID 1 on our
//! machines does not reap, so without one every killed grandchild would stay a zombie. The
//! supervisor reaps the whole subtree, kills the rest when the target exits or when the
//! trainer asks (SIGUSR1), and exits with the target's status. Why a PID namespace: killing its
//! init (the target) makes the kernel kill every process in it, including those that called
//! `setsid` to leave the process group.
//!
//! Privileges. As root (our machines and CI) each run gets two fresh uids: the target runs as
//! uid X, the supervisor as (real Y, effective X). RLIMIT_NPROC then really applies (the kernel
//! exempts uid 0), `kill(-1)` from the supervisor reaches exactly the processes of uid X, and
//! the sandbox cannot signal its supervisor (uid Y; Landlock's signal scope too). When an
//! allowed folder is not reachable by "others" (the pyenv python under a 0700 /root), the
//! target keeps CAP_DAC_READ_SEARCH (and nothing else) as an ambient capability so it can read
//! and traverse; what it may read is then decided by Landlock alone. Without root: a user
//! namespace holds the network and PID namespaces, the uid stays the caller's, and
//! RLIMIT_NPROC counts the processes of that uid inside the new user namespace (checked: the
//! hostile tests also pass when run as uid 65534).
//!
//! Fail closed: no Landlock (kernel < 5.13 or disabled) or no namespace ⇒ `SandboxError`, never
//! an unconfined run. Known gaps: pathname unix sockets that are world-writable can still be
//! connected to (Landlock does not cover `connect` on them in the ABIs we target); CPU time is
//! shared by scheduling, so a fork bomb (at most `max_procs` spinning processes) slows other
//! samples scored at the same time until its own timeout; a program that reads its own source
//! can see whatever that source contains.

mod child;
mod landlock;
mod watch;

use child::{child_setup, ChildCfg, PrivateMount};
use watch::watch;

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Folders every program needs to start (dynamic loader, libc, locale, time zone).
const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/alternatives",
    "/dev/urandom",
    "/dev/random",
    "/dev/zero",
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
    /// Size of the private folder, MiB (root mode: a tmpfs of this size, in memory; without
    /// root the folder is on the temp dir's disk and only `max_file_mb` bounds each file).
    pub disk_mb: u64,
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
            disk_mb: 64,
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
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        let last: String = last.chars().take(200).collect();
        format!(
            "{:?} after {:.2}s{}",
            self.end,
            self.wall.as_secs_f64(),
            if last.is_empty() {
                String::new()
            } else {
                format!(": {last}")
            }
        )
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
    if let Some((_, info)) = CACHE
        .lock()
        .ok()
        .and_then(|c| c.iter().find(|(k, _)| k == python).cloned())
    {
        return Ok(info);
    }
    let info = query_python(python)?;
    if let Ok(mut c) = CACHE.lock() {
        c.push((python.to_string(), info.clone()));
    }
    Ok(info)
}

fn query_python(python: &str) -> Result<PythonInfo, SandboxError> {
    let perr = |reason: String| SandboxError::Python {
        python: python.to_string(),
        reason,
    };
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
            let c =
                std::fs::canonicalize(p).map_err(io_err(format!("read path {}", p.display())))?;
            dac_bypass |= !reachable_by_others(&c, true);
            read_roots.push(c);
        }
        dac_bypass |= !reachable_by_others(&std::env::temp_dir(), false);
        Ok(Sandbox {
            spec,
            abi,
            privileged,
            dac_bypass: dac_bypass && privileged,
            read_roots,
        })
    }

    pub fn spec(&self) -> &SandboxSpec {
        &self.spec
    }

    /// Run `argv` (argv[0] an absolute path) in a fresh private folder holding `files`
    /// (name → content), feeding `stdin`. Err only when the sandbox itself failed; everything
    /// the program does is in `Outcome`.
    pub fn run(
        &self,
        argv: &[OsString],
        stdin: &[u8],
        files: &[(&str, &[u8])],
    ) -> Result<Outcome, SandboxError> {
        let start = Instant::now();
        let Some(program) = argv.first() else {
            return Err(SandboxError::Unsupported("empty command".into()));
        };
        let (uid_x, uid_y) = fresh_uids();
        for (name, _) in files {
            if name.is_empty() || name.contains('/') || *name == ".." || *name == "." {
                return Err(SandboxError::Unsupported(format!("bad file name {name:?}")));
            }
        }
        let dir = PrivateDir::create()?;
        let mut rules = landlock::Ruleset::new(self.abi).map_err(io_err("landlock ruleset"))?;
        for root in &self.read_roots {
            rules
                .allow(root, landlock::Access::ReadExec)
                .map_err(io_err(format!("landlock rule {}", root.display())))?;
        }
        rules
            .allow(Path::new("/dev/null"), landlock::Access::ReadWriteFile)
            .map_err(io_err("landlock rule /dev/null"))?;
        let mount = if self.privileged {
            // Written by the child into its tmpfs (see child.rs).
            let c = |p: &Path| {
                CString::new(p.as_os_str().as_bytes())
                    .map_err(|_| SandboxError::Unsupported(format!("NUL in path {}", p.display())))
            };
            let options = format!(
                "size={}m,nr_inodes=8192,mode=0700,uid={uid_x},gid={uid_x}",
                self.spec.disk_mb
            );
            Some(PrivateMount {
                dir: c(&dir.path)?,
                options: CString::new(options)
                    .map_err(|_| SandboxError::Unsupported("tmpfs options".into()))?,
                files: files
                    .iter()
                    .map(|(n, d)| Ok((c(&dir.path.join(n))?, d.to_vec())))
                    .collect::<Result<_, SandboxError>>()?,
                rights: landlock::full_access(self.abi),
            })
        } else {
            for (name, data) in files {
                let path = dir.path.join(name);
                std::fs::write(&path, data).map_err(io_err(format!("write {}", path.display())))?;
            }
            rules
                .allow(&dir.path, landlock::Access::Full)
                .map_err(io_err("landlock rule for the private folder"))?;
            None
        };

        let limits = [
            (
                libc::RLIMIT_CPU,
                cpu_seconds(self.spec.timeout),
                cpu_seconds(self.spec.timeout) + 1,
            ),
            (
                libc::RLIMIT_AS,
                self.spec.memory_mb << 20,
                self.spec.memory_mb << 20,
            ),
            (
                libc::RLIMIT_FSIZE,
                self.spec.max_file_mb << 20,
                self.spec.max_file_mb << 20,
            ),
            (
                libc::RLIMIT_NOFILE,
                self.spec.max_open_files,
                self.spec.max_open_files,
            ),
            (libc::RLIMIT_NPROC, self.spec.max_procs, self.spec.max_procs),
        ];
        let cfg = ChildCfg {
            privileged: self.privileged,
            mount,
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
            .stdin(if stdin.is_empty() {
                Stdio::null()
            } else {
                Stdio::piped()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: child_setup only makes async-signal-safe syscalls on data copied before fork.
        unsafe {
            cmd.pre_exec(move || child_setup(&cfg));
        }
        let mut child = cmd
            .spawn()
            .map_err(|source| {
                let hint = if source.kind() == io::ErrorKind::PermissionDenied {
                    " (the kernel refused a namespace, uid change or Landlock: needs root, or unprivileged user namespaces)"
                } else {
                    ""
                };
                SandboxError::Io { what: format!("start {}{hint}", Path::new(program).display()), source }
            })?;
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
        Ok(Outcome {
            end,
            stdout,
            stderr,
            wall,
            uid: self.privileged.then_some(uid_x),
        })
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
    let ok_dir = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.mode() & 0o001 != 0)
            .unwrap_or(false)
    };
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
    fn create() -> Result<Self, SandboxError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "ferrotune-sandbox-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(io_err(format!("create {}", path.display())))?;
        Ok(PrivateDir { path })
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        // The program may have removed its own permissions; we are its owner (or root).
        let _ = std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o700));
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// For callers that want to pass a command line as strings.
pub fn argv<I, S>(items: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    items
        .into_iter()
        .map(|s| s.as_ref().to_os_string())
        .collect()
}
