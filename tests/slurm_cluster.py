"""A private SLURM cluster on this host, started from the Debian packages (`slurm-wlm`, `munge`, `slurmdbd`,
`mariadb-server`) for the tests: munged on a private socket, MariaDB + slurmdbd for accounting (submitit reads job
states with `sacct`), slurmctld, and two slurmd "nodes" (1 CPU each, their own ports), all under one folder but their
Unix sockets (munged's, MariaDB's, slurmd's spool with slurmstepd's), which go to a short folder in /tmp: a socket's path
has at most 108 bytes, and slurmstepd's failed under a deep pytest folder (the batch step failed, the job was requeued held).
`SlurmCluster(root).start()` raises `ClusterUnavailable` with the reason where it cannot; `stop()` ends every daemon
it started, by pid. Commands (`sbatch`, `squeue`, submitit) find it through `SLURM_CONF` (`cluster.env`).
"""
from __future__ import annotations
import os, random, shutil, signal, socket, subprocess, tempfile, time, uuid
from pathlib import Path

PROGRAMS = ('munged', 'mariadb-install-db', 'mariadbd', 'slurmdbd', 'slurmctld', 'slurmd', 'sbatch', 'sacct', 'scontrol')
PACKAGES = 'slurm-wlm munge slurmdbd mariadb-server'

class ClusterUnavailable(RuntimeError):
    "The cluster cannot start here; the message says why."

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def _die_with_parent():
    "In a daemon, before it runs: SIGTERM when its parent (the test process, the notebook's kernel) dies, however it dies."
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG

def _alive(pid: int) -> bool:
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    try: return Path(f'/proc/{pid}/stat').read_text().split(') ')[-1][0] != 'Z'
    except OSError: return False

def node_names(n: int) -> list[str]:
    "Node names that resolve nowhere (`n1`, `n2`...): each slurmd is told its own with `-N`, its address is 127.0.0.1."
    return [f'n{i + 1}' for i in range(n)]

def unavailable() -> str | None:
    "Why the cluster cannot start on this machine (not root, packages missing), or None."
    if os.geteuid() != 0: return "the test cluster runs its daemons as root (SlurmUser=root)"
    missing = [p for p in PROGRAMS if not shutil.which(p, path=os.environ.get('PATH', '') + ':/usr/sbin')]
    return f"{', '.join(missing)} not found: apt-get install -y {PACKAGES}" if missing else None

class SlurmCluster:
    "A private SLURM cluster under `root`; `nodes` slurmd daemons on this host, one CPU each."
    def __init__(self, root: str | os.PathLike, nodes: int = 2):
        self.root, self.n = Path(root), nodes
        self.sockets: Path | None = None   # a short folder for the daemons' Unix sockets (108 bytes at most, with the names)
        self.pids: list[tuple[str, int]] = []
        self.name = f'mpify{uuid.uuid4().hex[:6]}'
        self.conf = self.root / 'etc' / 'slurm.conf'
        self.env = {'SLURM_CONF': str(self.conf)}

    # ---------------------------------------------------------------- start
    def start(self) -> 'SlurmCluster':
        if (why := unavailable()) is not None: raise ClusterUnavailable(why)
        self.nodes = node_names(self.n)
        for d in ('etc', 'log', 'state', 'db', 'run'): (self.root / d).mkdir(parents=True, exist_ok=True)
        self.sockets = Path(tempfile.mkdtemp(prefix='slurm-test-', dir='/tmp' if os.path.isdir('/tmp') else None))  # root may be too deep
        self.sockets.chmod(0o711)
        t0 = time.monotonic()
        try:
            self._munge()
            self._mariadb()
            self._write_conf()
            self._daemon('slurmdbd', [self._sbin('slurmdbd'), '-D'], self._dbd_up)
            self._daemon('slurmctld', [self._sbin('slurmctld'), '-D', '-i'], lambda: self._ok('scontrol', 'ping'))
            for n in self.nodes:
                self._daemon(f'slurmd {n}', [self._sbin('slurmd'), '-D', '-N', n], lambda: True)
            self._wait(self._nodes_idle, 30, "the slurmd nodes did not become idle")
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - t0
        return self

    def _sbin(self, name: str) -> str: return shutil.which(name) or f'/usr/sbin/{name}'

    def _log(self, name: str) -> Path: return self.root / 'log' / f"{name.replace(' ', '-')}.log"

    def _spawn(self, name: str, args: list[str], **kw) -> subprocess.Popen:
        log = open(self._log(name), 'ab')
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.cmd_env(),
                             start_new_session=True, preexec_fn=_die_with_parent, **kw)
        log.close()
        self.pids.append((name, p.pid))
        return p

    def _daemon(self, name: str, args: list[str], up, timeout: float = 30):
        p = self._spawn(name, args)
        self._wait(lambda: p.poll() is None and up(), timeout, f"{name} did not start", p)

    def _wait(self, cond, timeout: float, what: str, p: subprocess.Popen | None = None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p is not None and p.poll() is not None: break
            if cond(): return
            time.sleep(0.05)
        logs = '\n'.join(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}" for f in sorted((self.root / 'log').glob('*.log')))
        raise ClusterUnavailable(f"{what} (in {timeout:.0f} s)\n{logs}")

    def cmd_env(self) -> dict:
        "The environment for SLURM commands and daemons: this cluster's configuration."
        return {**os.environ, **self.env}

    def _ok(self, *cmd: str) -> bool:
        return subprocess.run(cmd, env=self.cmd_env(), capture_output=True).returncode == 0

    def run(self, *cmd: str, check: bool = True) -> str:
        "Run a SLURM command against this cluster; its stdout."
        r = subprocess.run(cmd, env=self.cmd_env(), capture_output=True, text=True, timeout=60)
        if check and r.returncode: raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
        return r.stdout

    def _munge(self):
        key = self.root / 'etc' / 'munge.key'
        key.write_bytes(os.urandom(1024)); key.chmod(0o400)
        self.socket = self.sockets / 'munge.socket'
        p = self._spawn('munged', [self._sbin('munged'), '-F', '--force', f'--socket={self.socket}', f'--key-file={key}',
                                   f"--pid-file={self.root / 'run' / 'munged.pid'}", f"--log-file={self._log('munged-own')}",
                                   f"--seed-file={self.root / 'run' / 'munge.seed'}", '--num-threads=2'])
        self._wait(self.socket.exists, 10, "munged did not start", p)

    def _mariadb(self):
        db, self.db_sock, self.db_port = self.root / 'db', self.sockets / 'mysqld.sock', _free_port()
        r = subprocess.run(['mariadb-install-db', f'--datadir={db}', '--user=root', '--auth-root-authentication-method=socket',
                            '--skip-test-db', '--skip-name-resolve'], capture_output=True, text=True)
        if r.returncode: raise ClusterUnavailable(f"mariadb-install-db failed: {r.stderr[-1000:]}")
        init = self.root / 'etc' / 'db-init.sql'
        init.write_text("CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';\n"
                        "GRANT ALL ON *.* TO 'slurm'@'127.0.0.1';\n")
        self._daemon('mariadbd', [self._sbin('mariadbd'), '--no-defaults', f'--datadir={db}', '--user=root',
                                  f'--socket={self.db_sock}', f'--port={self.db_port}', '--bind-address=127.0.0.1',
                                  f"--pid-file={self.root / 'run' / 'mariadb.pid'}", '--skip-name-resolve',
                                  f'--init-file={init}', '--innodb-buffer-pool-size=16M', '--skip-log-bin',
                                  '--innodb-log-file-size=8M', '--performance-schema=0'],
                     lambda: self.db_sock.exists())

    def _write_conf(self):
        r, self.ctld_port, self.dbd_port = self.root, _free_port(), _free_port()
        auth = f'AuthInfo=socket={self.socket},cred_expire=10'
        nodes = '\n'.join(f'NodeName={n} NodeAddr=127.0.0.1 Port={_free_port()} CPUs=1 '
                          f'RealMemory=1000 State=UNKNOWN' for n in self.nodes)
        # job ids of their own: submitit derives MASTER_PORT from the job id, and another cluster may run on this host
        self.conf.write_text(f"""ClusterName={self.name}
FirstJobId={random.randint(10_000, 9_000_000)}
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
{auth}
AuthType=auth/munge
CredType=cred/munge
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
ReturnToService=2
MinJobAge=300
KillWait=5
StateSaveLocation={r}/state/ctld
SlurmdSpoolDir={self.sockets}/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld-own.log
SlurmdLogFile={r}/log/slurmd-%n-own.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={self.dbd_port}
AccountingStoragePass={self.socket}
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        dbd = self.root / 'etc' / 'slurmdbd.conf'
        dbd.write_text(f"""{auth}
AuthType=auth/munge
DbdHost={socket.gethostname().split(".")[0]}
DbdAddr=127.0.0.1
DbdPort={self.dbd_port}
SlurmUser=root
LogFile={r}/log/slurmdbd-own.log
PidFile={r}/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.db_port}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_{self.name}
""")
        dbd.chmod(0o600)

    def _dbd_up(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex(('127.0.0.1', self.dbd_port)) == 0

    def _nodes_idle(self) -> bool:
        r = subprocess.run(['sinfo', '-h', '-N', '-o', '%N %t'], env=self.cmd_env(), capture_output=True, text=True)
        states = dict(l.split() for l in r.stdout.splitlines() if l.strip())
        return len(states) == len(self.nodes) and all(s == 'idle' for s in states.values())

    # ---------------------------------------------------------------- jobs and stop
    def jobs(self) -> list[str]:
        "Ids of the jobs still queued or running."
        return self.run('squeue', '-h', '-o', '%i', check=False).split()

    def job_processes(self) -> list[int]:
        "The pids of this cluster's job steps (`slurmstepd`) and tasks: processes whose environment names its `slurm.conf`."
        mine, out = f'SLURM_CONF={self.conf}'.encode(), []
        for d in os.listdir('/proc'):
            if not d.isdigit() or int(d) == os.getpid(): continue
            try: env, comm = Path(f'/proc/{d}/environ').read_bytes().split(b'\0'), Path(f'/proc/{d}/comm').read_text().strip()
            except OSError: continue
            if mine in env and (comm == 'slurmstepd' or any(e.startswith(b'SLURM_JOB_ID=') for e in env)) and _alive(int(d)):
                out.append(int(d))
        return out

    def stop(self):
        """Cancel every job and wait (10 s at most) until its steps are gone, then stop the daemons this cluster started, by
        pid: SLURM's first, then slurmdbd, MariaDB, munged. Steps that outlived the wait are killed, by pid."""
        if any(n == 'slurmctld' for n, _ in self.pids):
            subprocess.run(['scancel', '--full', '-u', 'root'], env=self.cmd_env(), capture_output=True)
            deadline = time.monotonic() + 10
            while (self.jobs() or self.job_processes()) and time.monotonic() < deadline: time.sleep(0.2)
        for pid in self.job_processes():
            try: os.kill(pid, signal.SIGKILL)
            except ProcessLookupError: pass
        slurm = [pid for n, pid in self.pids if n.startswith(('slurmd', 'slurmctld')) and n != 'slurmdbd']
        for group in (slurm, *([pid] for n, pid in reversed(self.pids) if pid not in slurm)): _terminate(group)
        self.pids = []
        if self.sockets: shutil.rmtree(self.sockets, ignore_errors=True)

def _terminate(pids: list[int], grace: float = 10):
    "SIGTERM `pids` (children of this process), SIGKILL those alive after `grace` seconds, and reap them."
    for pid in pids:
        try: os.kill(pid, signal.SIGTERM)
        except ProcessLookupError: pass
    deadline = time.monotonic() + grace
    while any(map(_alive, pids)) and time.monotonic() < deadline: time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            try: os.kill(pid, signal.SIGKILL)
            except ProcessLookupError: pass
        try: os.waitpid(pid, 0)
        except ChildProcessError: pass
