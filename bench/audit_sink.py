"""Cost of one audit record: appended to a file by the job, against sent to safehookd (one
seqpacket message, stamped, chained and appended by the daemon, acknowledged), in one run.

Each sink gets RECORDS records of a step-sized payload through safehook._core.audit, in
alternating rounds of 500 so that machine load hits both alike. Prints the median microseconds
per record of each and their ratio (daemon / file).

    python bench/audit_sink.py --safehookd build/daemon/safehookd [--records 5000]
"""
import argparse
import os
import statistics
import subprocess
import tempfile
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--safehookd", required=True)
    ap.add_argument("--records", type=int, default=5000)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="sh-bench-")
    sock = os.path.join(d, "audit.sock")
    daemon = subprocess.Popen([a.safehookd, "--socket", sock, "--log", os.path.join(d, "log", "audit.jsonl")])
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        bench = ("import json, sys, time\n"
                 "from safehook import _core\n"
                 "_core.configure(policy_text=json.dumps(json.loads(sys.argv[1])), policy_name='bench')\n"
                 "fields = {'opt': 0, 'cosine': -0.25, 'projected': True, 'norms': {'task': 1.5, 'safety': 0.7}}\n"
                 "out = []\n"
                 "for r in range(int(sys.argv[2])):\n"
                 "    t = time.perf_counter()\n"
                 "    for i in range(500):\n"
                 "        _core.audit('step', fields, step=i)\n"
                 "    out.append((time.perf_counter() - t) / 500 * 1e6)\n"
                 "print(json.dumps(out))\n")
        import json
        rounds = max(1, a.records // 500)
        res = {"file": [], "daemon": []}
        for r in range(rounds):
            for sink in ("file", "daemon"):
                audit = {"sink": "daemon", "socket": sock} if sink == "daemon" else {"path": os.path.join(d, "file.jsonl")}
                pol = json.dumps({"version": 1, "audit": audit})
                out = subprocess.run([sys.executable, "-c", bench, pol, "1"],
                                     capture_output=True, text=True, check=True).stdout
                res[sink] += json.loads(out)
        f, dm = statistics.median(res["file"]), statistics.median(res["daemon"])
        print("records per sink: %d (rounds of 500, alternating)" % (rounds * 500))
        print("file   %.1f us/record" % f)
        print("daemon %.1f us/record" % dm)
        print("ratio daemon/file: %.2f" % (dm / f))
    finally:
        daemon.terminate()
        daemon.wait()


if __name__ == "__main__":
    main()
