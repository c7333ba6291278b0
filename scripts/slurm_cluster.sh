#!/usr/bin/env bash
# A real single-node Slurm (with accounting) on this Debian machine, for the tests and for trying
# `cluster=slurm` locally. Root, no systemd: the daemons are started by hand and fork away.
#
#   bash scripts/slurm_cluster.sh start  [--record FILE]  # install if needed, start what is not running
#   bash scripts/slurm_cluster.sh stop   [--record FILE]  # stop by PID: only the daemons listed in FILE,
#                                                         # or (no FILE) those named by our pid files
#   bash scripts/slurm_cluster.sh status
#
# --record FILE: `start` appends "<daemon> <pid>" for every daemon THIS invocation started (daemons
# that were already up are left alone and not recorded); `stop --record FILE` stops exactly those
# PIDs (after checking each PID still runs that program), never by name. scripts/run_tests.sh uses
# this, so a cluster that was up before the tests stays up after them.
#
# Accounting (MariaDB + slurmdbd) is always on: submitit reads job states from sacct; without it a
# cancelled or killed job leaves job.result() waiting forever.
#
# Knobs (env): EVO2_SLURM_CPUS (default 8: CPUs the node advertises; more than the cores, so 2-task
# jobs and small sweeps run side by side), EVO2_SLURM_PARTITION_NAME (default debug).
# Timing on the 2-core CI machine: ~12 s from nothing (apt included), ~1 s when already up.
set -euo pipefail

ACTION="${1:-}"
shift || true
RECORD=""
while [ $# -gt 0 ]; do
  case "$1" in
    --record) RECORD="${2:?--record needs a file}"; shift 2 ;;
    *) echo "slurm_cluster.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

CPUS="${EVO2_SLURM_CPUS:-8}"
PARTITION="${EVO2_SLURM_PARTITION_NAME:-debug}"
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
LOCK=/run/evo2_slurm_cluster.lock
# daemon name (as in /proc/PID/comm) -> pid file; listed in start order
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
declare -A PIDFILE=(
  [munged]=/run/munge/munged.pid
  [mariadbd]=/run/mysqld/mysqld.pid
  [slurmdbd]=/run/slurmdbd.pid
  [slurmctld]=/run/slurmctld.pid
  [slurmd]=/run/slurmd.pid
)

T0=${EPOCHREALTIME/./}
say() {
  local ms=$(( (${EPOCHREALTIME/./} - T0) / 1000 ))
  printf '[slurm_cluster %d.%03ds] %s\n' $((ms / 1000)) $((ms % 1000)) "$*"
}
# a pid runs the program we expect (guards against a stale pid file or a recycled PID)
runs() { [ -n "$2" ] && [ "$(cat "/proc/$2/comm" 2>/dev/null)" = "$1" ]; }
pid_of() { local f="${PIDFILE[$1]}"; [ -s "$f" ] && cat "$f" || true; }
up() { runs "$1" "$(pid_of "$1")"; }
record() { if [ -n "$RECORD" ]; then echo "$1 $(pid_of "$1")" >> "$RECORD"; fi; }
wait_for() {  # wait_for SECONDS CMD...: retry CMD every 0.1 s
  local tries=$(( $1 * 10 )); shift
  for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  "$@"  # last try shows its error
}
stop_pid() {  # stop_pid NAME PID: SIGTERM, wait up to 15 s, then SIGKILL
  local name=$1 pid=$2
  runs "$name" "$pid" || { echo "$name (pid $pid): not running"; return 0; }
  kill "$pid"
  for _ in $(seq 150); do runs "$name" "$pid" || break; sleep 0.1; done
  if runs "$name" "$pid"; then kill -KILL "$pid"; echo "$name (pid $pid): killed"; else echo "$name (pid $pid): stopped"; fi
}

case "$ACTION" in
  start|stop) ;;
  status)
    for d in "${DAEMONS[@]}"; do
      if up "$d"; then echo "$d: running, pid $(pid_of "$d")"; else echo "$d: not running"; fi
    done
    if up slurmctld; then sinfo; fi
    exit 0 ;;
  *) echo "usage: $0 start|stop|status [--record FILE]" >&2; exit 2 ;;
esac

[ "$(id -u)" = 0 ] || { echo "slurm_cluster.sh: needs root (installs packages, starts daemons)" >&2; exit 1; }
# one start/stop at a time (several test runs may share this machine). Every daemon is started
# with `9>&-`: a daemon that inherited the lock's fd would hold the lock forever.
exec 9>"$LOCK"
flock -w 120 9 || { echo "slurm_cluster.sh: $LOCK is held by another start/stop for 120 s" >&2; exit 1; }

if [ "$ACTION" = stop ]; then
  if [ -n "$RECORD" ]; then
    [ -f "$RECORD" ] || { echo "slurm_cluster.sh: no record file $RECORD" >&2; exit 1; }
    # reverse start order: slurmd first, munged last
    tac "$RECORD" | while read -r name pid; do [ -n "$name" ] && stop_pid "$name" "$pid"; done
  else
    for (( i=${#DAEMONS[@]}-1; i>=0; i-- )); do
      d=${DAEMONS[$i]}; p=$(pid_of "$d"); [ -n "$p" ] && stop_pid "$d" "$p"
    done
  fi
  exit 0
fi

# ---- start -------------------------------------------------------------------------------------
say "start"

# 1) packages. --no-install-recommends keeps it to ~27 packages (recommends pull ~40 plugin packages).
PKGS=(slurm-wlm munge slurmdbd mariadb-server)
MISSING=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || MISSING+=("$p")
done
if [ "${#MISSING[@]}" -gt 0 ]; then
  say "installing ${MISSING[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  # postinst scripts try to start the services; without systemd invoke-rc.d declines (harmless)
  apt-get install -y -q --no-install-recommends "${PKGS[@]}" >/dev/null
fi
say "packages ok"

# 2) slurmd finds its NodeName by hostname and torch uses it as MASTER_ADDR: it must resolve
HOST="$(hostname -s)"
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts

# 3) munge: key owned by munge, plus the runtime folder systemd-tmpfiles would have made
[ -s /etc/munge/munge.key ] || /usr/sbin/mungekey --create --keyfile /etc/munge/munge.key
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
if ! up munged; then
  rm -f /run/munge/munge.socket.2 /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 9>&-
  wait_for 5 bash -c 'munge -n | unmunge'
  record munged
  say "munged started (pid $(pid_of munged))"
fi

# 4) slurm.conf. Everything as root (no spool ownership to get right), no cgroups (linuxproc +
#    task/none), CR_Core (memory is not consumed, but a --mem above RealMemory is still refused).
#    KillWait: seconds between SIGTERM and SIGKILL, the time a task has to checkpoint on requeue.
#    CPUs above the core count are accepted thanks to SlurmdParameters=config_overrides.
MEM_MB=$(( $(free -m | awk '/^Mem:/{print $2}') - 512 ))
install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > "$CONF.new" <<EOF
# written by evo2_hydra scripts/slurm_cluster.sh: one node on localhost, accounting via slurmdbd
ClusterName=evo2ci
SlurmctldHost=${HOST}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=300
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=${PIDFILE[slurmctld]}
SlurmdPidFile=${PIDFILE[slurmd]}
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
if [ -f "$CONF" ] && cmp -s "$CONF" "$CONF.new"; then
  rm -f "$CONF.new"
else
  # a changed node line needs a restart (scontrol reconfigure refuses it)
  for d in slurmd slurmctld; do if up "$d"; then stop_pid "$d" "$(pid_of "$d")"; fi; done
  mv "$CONF.new" "$CONF"
  say "slurm.conf written"
fi

# 5) accounting: MariaDB on its unix socket only (root logs in by socket auth) + slurmdbd
install -d -o mysql -g mysql -m 0755 /run/mysqld
if ! up mariadbd; then
  # Debian's postinst initialised /var/lib/mysql already
  setsid /usr/sbin/mariadbd --user=mysql --skip-networking --socket=/run/mysqld/mysqld.sock \
    --pid-file="${PIDFILE[mariadbd]}" </dev/null >/var/log/slurm/mariadb.log 2>&1 9>&- &
  wait_for 30 mariadb -e 'select 1'
  wait_for 5 test -s "${PIDFILE[mariadbd]}"
  record mariadbd
  say "mariadbd started (pid $(pid_of mariadbd))"
fi
cat > "$DBD_CONF.new" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
LogFile=/var/log/slurm/slurmdbd.log
PidFile=${PIDFILE[slurmdbd]}
DebugLevel=info
EOF
chmod 0600 "$DBD_CONF.new"   # slurmdbd refuses a config others can read
if [ -f "$DBD_CONF" ] && cmp -s "$DBD_CONF" "$DBD_CONF.new"; then rm -f "$DBD_CONF.new"; else mv "$DBD_CONF.new" "$DBD_CONF"; fi
if ! up slurmdbd; then
  /usr/sbin/slurmdbd </dev/null >/dev/null 2>&1 9>&-
  # sacctmgr finds slurmdbd through slurm.conf (written above); the first start creates the tables
  wait_for 30 sacctmgr -n show cluster
  record slurmdbd
  say "slurmdbd started (pid $(pid_of slurmdbd))"
fi

# 6) slurmctld + slurmd. Never `slurmctld -c`: job ids must keep counting up (a submitit folder
#    keyed by %j from an earlier cluster would otherwise hand back an old job's result).
if ! up slurmctld; then
  /usr/sbin/slurmctld </dev/null >/dev/null 2>&1 9>&-
  wait_for 10 bash -c 'scontrol ping | grep -q UP'
  record slurmctld
  say "slurmctld started (pid $(pid_of slurmctld))"
fi
if ! up slurmd; then
  /usr/sbin/slurmd </dev/null >/dev/null 2>&1 9>&-
  wait_for 5 test -s "${PIDFILE[slurmd]}"
  record slurmd
  say "slurmd started (pid $(pid_of slurmd))"
fi

# 7) wait until the node takes jobs, check that accounting answers
node_ready() { case "$(sinfo -h -N -o '%t' | head -1)" in idle*|mix*|alloc*) return 0 ;; *) return 1 ;; esac; }
wait_for 30 node_ready
sacct -X -n -o JobID >/dev/null
say "ready: partition ${PARTITION}, ${CPUS} CPUs; $(sinfo -h -o '%P %a %D %t' | head -1)"
