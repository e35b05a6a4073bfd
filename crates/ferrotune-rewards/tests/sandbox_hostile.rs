//! Hostile programs scored by `code_tests`: each must be contained, score 0.0, end quickly, and
//! leave no process behind (checked in /proc by the fresh uid the run used).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{code_tests, parse_spec, row, run, run_with, set_mode};
use ferrotune_rewards::sandbox::End;
use ferrotune_rewards::{CodeTests, Sample};
use serde_json::Map;

/// The trait path the trainer uses: a mixed batch scored in parallel, each sample on its own.
#[test]
fn batch_through_the_registry() {
    let row = row();
    let codes = [
        "x = 1",
        "while True:\n    pass",
        "assert False",
        "print('ok')",
    ];
    let completions: Vec<String> = codes
        .iter()
        .map(|c| format!("```python\n{c}\n```"))
        .collect();
    let samples: Vec<Sample> = completions
        .iter()
        .map(|c| Sample {
            prompt: "",
            completion: c,
            completion_tokens: 1,
            row: &row,
        })
        .collect();
    let no_tests = Map::new();
    let mut with_untested = samples.clone();
    with_untested.push(Sample {
        prompt: "",
        completion: "x = 1",
        completion_tokens: 1,
        row: &no_tests,
    });
    let t = Instant::now();
    let scores = code_tests().score_detailed(&with_untested);
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(
        scores.values,
        vec![Some(1.0), Some(0.0), Some(0.0), Some(1.0), None]
    );
    assert!(scores.failures.is_empty(), "{:?}", scores.failures);
}

#[test]
fn benign_program_passes() {
    let (score, out) = run("x = 1");
    assert_eq!(score, Some(1.0));
    assert!(out.success(), "{}", out.reason());
}

#[test]
fn infinite_loop_times_out() {
    let (score, out) = run("while True:\n    pass");
    assert_eq!(score, Some(0.0));
    assert_eq!(out.end, End::Timeout);
    assert!(out.wall < Duration::from_secs(4), "{:?}", out.wall);
}

#[test]
fn memory_bomb_fails() {
    let (score, out) = run("x = bytearray(10 * 1024 ** 3)\nprint(len(x))");
    assert_eq!(score, Some(0.0));
    assert_eq!(out.end, End::MemoryLimit, "{}", out.reason());
    // Growing slowly to the limit: page faults are slow on these VMs, so a smaller limit keeps
    // the test fast.
    let small = CodeTests::from_spec(&parse_spec(
        "rewards = [{ name = \"code_tests\", timeout_s = 5, memory_mb = 96 }]",
    ))
    .unwrap();
    let (score, out) = run_with(
        &small,
        "xs = []\nwhile True:\n    xs.append(bytearray(10_000_000))",
    );
    assert_eq!(score, Some(0.0));
    assert_eq!(out.end, End::MemoryLimit, "{}", out.reason());
}

#[test]
fn network_is_unreachable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let code = format!(
        "import socket\nok = []\nfor addr in [('1.1.1.1', 80), ('127.0.0.1', {port})]:\n    s = socket.socket()\n    s.settimeout(0.5)\n    try:\n        s.connect(addr)\n        ok.append(addr)\n    except OSError as e:\n        print('blocked', addr, e)\nassert ok, 'no connection'\nprint('CONNECTED', ok)"
    );
    let (score, out) = run(&code);
    assert_eq!(score, Some(0.0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("CONNECTED"), "{stdout}");
    assert_eq!(stdout.matches("blocked").count(), 2, "{stdout}");
    assert!(
        listener.accept().is_err(),
        "the sandbox reached our listening socket"
    );

    // UDP is outside Landlock's TCP rules: only the network namespace stops this one.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_nonblocking(true).unwrap();
    let port = udp.local_addr().unwrap().port();
    let code = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ntry:\n    s.sendto(b'leak', ('127.0.0.1', {port}))\n    print('SENT')\nexcept OSError as e:\n    print('blocked', e)\n    raise"
    );
    let (score, out) = run(&code);
    assert_eq!(score, Some(0.0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("blocked") && !stdout.contains("SENT"),
        "{stdout}"
    );
    let mut buf = [0u8; 16];
    assert!(udp.recv(&mut buf).is_err(), "a datagram left the sandbox");
}

/// A world-readable secret in a world-readable folder: only Landlock stands in the way.
#[test]
fn cannot_read_outside_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "TOPSECRET-4f1c").unwrap();
    set_mode(&secret, 0o644);
    let code = format!(
        "for p in [{:?}, '/etc/passwd', '/root/.bashrc', '/proc/1/environ']:\n    try:\n        print(open(p).read())\n    except OSError as e:\n        print('denied', p, e)\nimport os\nprint(os.listdir('/tmp')[:3])",
        secret.to_str().unwrap()
    );
    let (score, out) = run(&code);
    assert_eq!(score, Some(0.0), "{}", out.reason());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("TOPSECRET"), "{stdout}");
    assert!(!stdout.contains("root:x:0:0"), "{stdout}");
    assert!(stdout.contains("denied"), "{stdout}");
}

#[test]
fn cannot_write_outside_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o777);
    let inside_test = dir.path().join("escaped.txt");
    let in_tmp = std::env::temp_dir().join(format!("ferrotune-escape-{}", std::process::id()));
    let code = format!(
        "open({:?}, 'w').write('x')\nopen({:?}, 'w').write('x')\nopen('allowed.txt', 'w').write('fine')",
        inside_test.to_str().unwrap(),
        in_tmp.to_str().unwrap()
    );
    let (score, _) = run(&code);
    assert_eq!(score, Some(0.0));
    assert!(!inside_test.exists());
    assert!(!in_tmp.exists());
    // Writing in its own folder works (so the denial above is not a broken sandbox).
    let (score, out) =
        run("open('allowed.txt', 'w').write('fine')\nprint(open('allowed.txt').read())");
    assert_eq!(score, Some(1.0), "{}", out.reason());
}

#[test]
fn huge_output_is_capped_and_killed() {
    let (score, out) = run("import sys\nchunk = 'x' * 1_000_000\nfor _ in range(100):\n    sys.stdout.write(chunk)\nsys.stdout.flush()");
    assert_eq!(score, Some(0.0));
    assert_eq!(out.end, End::OutputLimit);
    assert_eq!(out.stdout.len(), 1 << 20);
    assert!(out.wall < Duration::from_secs(3), "{:?}", out.wall);
}

#[test]
fn exit_zero_before_the_tests_does_not_pass() {
    let (score, out) = run("import os\nos._exit(0)");
    assert!(out.success());
    assert_eq!(score, Some(0.0));
    let (score, _) = run("import sys\nsys.exit(0)");
    assert_eq!(score, Some(0.0));
}

/// The pyenv interpreter lives under a 0700 /root, so on our machines the sandbox keeps
/// CAP_DAC_READ_SEARCH; that capability also allows open_by_handle_at, which opens files by
/// inode handle instead of by path. Landlock must still refuse.
#[test]
fn cannot_read_by_file_handle() {
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "HANDLESECRET-77").unwrap();
    set_mode(&secret, 0o644);
    let code = format!(
        r#"import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
class Handle(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint), ("type", ctypes.c_int), ("data", ctypes.c_ubyte * 128)]
h = Handle(); h.size = 128
mount_id = ctypes.c_int()
r = libc.name_to_handle_at(-100, {path:?}.encode(), ctypes.byref(h), ctypes.byref(mount_id), 0)
print("name_to_handle_at", r, ctypes.get_errno())
# The mount fd must be on the secret's filesystem: /usr is readable and usually on it.
for where in ["/usr", "/", "."]:
    try:
        mfd = os.open(where, os.O_RDONLY)
    except OSError as e:
        print("no mount fd", where, e)
        continue
    fd = libc.open_by_handle_at(mfd, ctypes.byref(h), os.O_RDONLY)
    print("open_by_handle_at", where, fd, ctypes.get_errno())
    if fd >= 0:
        print(os.read(fd, 100))
"#,
        path = secret.to_str().unwrap()
    );
    let (score, out) = run(&code);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("HANDLESECRET"), "{stdout}");
    // The handle is obtained (path lookup is not restricted); opening it must fail.
    assert!(
        stdout.contains("name_to_handle_at 0 "),
        "{stdout} {}",
        out.reason()
    );
    assert!(!stdout.contains("open_by_handle_at /usr 3"), "{stdout}");
    // On our machines /usr and the test's temp dir share the root filesystem, so as root (with
    // the capability) the open is attempted for real and refused with EACCES by Landlock.
    // Without root the capability is missing and the kernel says EPERM first.
    if same_filesystem("/usr", dir.path()) && out.uid.is_some() {
        assert!(
            stdout.contains("open_by_handle_at /usr -1 13"),
            "{stdout} {}",
            out.reason()
        );
    }
    assert_eq!(score, Some(1.0)); // the program itself ran to the end
}

fn same_filesystem(a: impl AsRef<Path>, b: impl AsRef<Path>) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(a).unwrap().dev() == std::fs::metadata(b).unwrap().dev()
}

#[test]
fn file_size_is_capped() {
    let (score, out) = run("with open('big.bin', 'wb') as f:\n    f.write(b'x' * (20 << 20))");
    assert_eq!(score, Some(0.0));
    // Python ignores SIGXFSZ, so the write fails with EFBIG instead of killing it.
    assert_eq!(out.end, End::Exited(1), "{}", out.reason());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("File too large"),
        "{}",
        out.reason()
    );
}

/// Many files each under the per-file cap: as root the private folder is a 64 MiB tmpfs, so
/// the disk cannot be filled. (Without root the folder is on disk: see SandboxSpec::disk_mb.)
#[test]
fn private_folder_is_bounded() {
    let (score, out) = run("for i in range(20):\n    with open(f'f{i}.bin', 'wb') as f:\n        f.write(b'x' * (10 << 20))");
    if out.uid.is_some() {
        assert_eq!(score, Some(0.0));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("No space left on device"), "{}", out.reason());
    }
}
