//! The fork bomb, alone in its own test binary: cargo runs test binaries one after another, so
//! its 16 spinning processes do not starve the timing-sensitive tests of sandbox_hostile.rs.

mod common;

use common::run;
use ferrotune_rewards::sandbox::End;

#[test]
fn fork_bomb_is_capped_and_killed() {
    // Children also leave the process group and session, which a group kill would miss.
    let code = "import os\nwhile True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n    except OSError:\n        pass";
    let (score, out) = run(code);
    assert_eq!(score, Some(0.0));
    assert_eq!(out.end, End::Timeout);
}
