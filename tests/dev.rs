//! `augur dev`: three meta members, three nodes, the default volume mounted; Ctrl-C unmounts
//! cleanly; a restart on the same state directory finds every file again.

mod common;

use common::DevProc;

#[test]
fn dev_mounts_stops_cleanly_and_finds_its_files_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (state, mnt) = (tmp.path().join("state"), tmp.path().join("mnt"));
    let mut dev = DevProc::start(&state, &mnt, "127.0.0.9");
    std::fs::create_dir(mnt.join("dir")).unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(mnt.join("dir/file"), &data).unwrap();
    std::os::unix::fs::symlink("dir/file", mnt.join("link")).unwrap();
    assert!(dev.stop().success(), "augur dev exits cleanly on Ctrl-C:\n{}", dev.log());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(mnt.to_str().unwrap()), "unmounted on Ctrl-C");

    let mut again = DevProc::start(&state, &mnt, "127.0.0.9");
    assert_eq!(std::fs::read(mnt.join("link")).unwrap(), data, "found again after a restart");
    assert!(again.stop().success());
}
