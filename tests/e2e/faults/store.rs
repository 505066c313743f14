//! The store unavailable for the fault window, under a steady load: a private PostgreSQL
//! cluster (the machine's server is shared with other tests, so it is never the one stopped)
//! stopped with `pg_ctl stop -m fast` and started again; and a SQLite store on a small tmpfs
//! filled up and freed. Ingest answers `503` with `Retry-After` meanwhile and writes nothing
//! half; herald recovers without a restart.

use super::load::Load;
use super::vendor::Vendor;
use super::{CALM, NO_ENV, RATE, assert_exactly_once, settle, summary, webhook_template, window};
use crate::support::{Serve, create_app};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// A PostgreSQL cluster of its own in a temporary directory, on a free port, from the
/// machine's binaries (`/usr/lib/postgresql/<version>/bin`). As root, its commands run as the
/// `postgres` user (initdb refuses root). Stopped when dropped.
struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_root: bool,
}

impl PrivatePostgres {
    fn start() -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("the PostgreSQL server binaries (/usr/lib/postgresql/<version>/bin) are needed")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("pg_ctl").exists())
            .max()
            .expect("no pg_ctl under /usr/lib/postgresql");
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        let dir = tempfile::tempdir().unwrap();
        if as_root {
            let chown = Command::new("chown")
                .arg("postgres")
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(
                chown.success(),
                "cannot give the cluster directory to postgres"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = PrivatePostgres {
            dir,
            bin,
            port,
            as_root,
        };
        let data = pg.data();
        pg.run(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        pg.start_again();
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// A command running one of the cluster's binaries, as `postgres` when we are root.
    fn command(&self, tool: &str) -> Command {
        let tool = self.bin.join(tool);
        if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(tool);
            c
        } else {
            Command::new(tool)
        }
    }

    /// Runs one of the cluster's binaries and checks it succeeded.
    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    fn start_again(&self) {
        let socket_dir = self.dir.path().display().to_string();
        let options = format!(
            "-p {} -k {socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port
        );
        let log = self.dir.path().join("log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &options,
                "-w",
                "start",
            ],
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_answers_503_and_recovers_without_a_restart() {
    let pg = tokio::task::block_in_place(PrivatePostgres::start);
    let url = pg.url();
    outage("postgres-stopped", &url, || pg.stop(), || pg.start_again()).await;
}

/// Runs herald on the store at `url` under the steady load, breaks the store with `break_it`
/// for the fault window and mends it with `mend` (neither restarts herald), then checks that
/// every accepted message was sent exactly once and that the outage was answered with `503`.
async fn outage(name: &str, url: &str, break_it: impl FnOnce(), mend: impl FnOnce()) {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--store", url];
    // The key that seals account secrets (a PostgreSQL store needs one; SQLite would make it).
    let entry = herald_core::secrets::SecretBox::generate_entry("k1");
    std::fs::write(dir.path().join("secret.key"), entry).unwrap();
    let vendor = Vendor::start(Duration::ZERO).await;
    let key = create_app(dir.path(), &args);
    let herald = Serve::start(dir.path(), &args, &NO_ENV);
    let template = webhook_template(&herald.base, &key, &vendor, 5_000).await;
    let load = Load::start(&herald.base, &key, template, RATE, "r");
    tokio::time::sleep(CALM).await;
    let before = load.accepted();
    tokio::task::block_in_place(break_it);
    tokio::time::sleep(window()).await;
    let during = load.accepted() - before;
    tokio::task::block_in_place(mend);
    let fault_end = Instant::now();
    tokio::time::sleep(CALM).await;
    let (accepted, answers) = load.finish().await;
    let tally = settle(url, &accepted, &vendor, fault_end).await;
    eprintln!(
        "{}",
        summary(
            name,
            RATE,
            Some(window()),
            &answers,
            &tally,
            &format!(" accepted_during_outage={during}")
        )
    );
    assert_exactly_once(name, &answers, &tally);
    assert!(
        answers.statuses.get(&503).is_some_and(|n| *n > 0),
        "{name}: no 503 while the store was out of reach: {answers:?}"
    );
}

/// A tmpfs of its own (mounting needs root), to be filled up; unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(megabytes: u64) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the disk-full test mounts a tmpfs, which needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn filler(&self) -> PathBuf {
        self.path().join("filler")
    }

    /// Writes a file until the disk is full.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.filler()).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.flush();
    }

    fn free(&self) {
        std::fs::remove_file(self.filler()).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sqlite_disk_answers_503_and_recovers_without_a_restart() {
    let disk = SmallDisk::mount(128);
    let url = format!("sqlite://{}", disk.path().join("herald.db").display());
    outage("sqlite-disk-full", &url, || disk.fill(), || disk.free()).await;
}
