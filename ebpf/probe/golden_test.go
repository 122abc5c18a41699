package probe

import (
	"bytes"
	"flag"
	"io"
	"log/slog"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/pushrelay/pushrelay/sidecar/telemetry"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden from the current output")

// The whole /metrics text of the probes for a fixed counter state, diffed
// against a committed fixture as node_exporter's end-to-end test does:
// names, labels, HELP, TYPE and order are the contract with dashboards.
func TestMetricsTextMatchesGolden(t *testing.T) {
	for _, tc := range []struct {
		name string
		snap snapshot
	}{
		{"ebpf", snapshot{
			modes: map[string]string{ProbeConn: ModeTpBTF, ProbePackets: ModeCgroupSKB, ProbeTCPEvents: ModeTpBTF},
			ports: []portFigures{
				{port: 80, established: 1000042, hasEst: true, c: bpfCounters{Accepted: 3200, Closed: 3100, RxPackets: 130000, RxBytes: 6760000, RxPayload: 1560000, TxPackets: 150000, TxBytes: 25800000, TxPayload: 18000000,
					RstSent: 17, RstReceived: 230, RetransSegs: 1234, LifetimeNs: 123456789012345,
					Lifetime: [16]uint64{1000, 800, 300, 100, 200, 100, 50, 50, 150, 100, 100, 80, 20, 10, 5, 3}}},
				{port: 443, established: 7, hasEst: true, c: bpfCounters{Accepted: 12, Closed: 5, RxPackets: 60, RxBytes: 3120, TxPackets: 61, TxBytes: 9000, TxPayload: 5000,
					RstReceived: 1, LifetimeNs: 2500000000, Lifetime: [16]uint64{3: 2, 4: 3}}},
			},
			host:    hostFigures{PassiveOpens: 3212, ActiveOpens: 40, CurrEstab: 1000049, InSegs: 130061, OutSegs: 150062, InOctets: 6763120, OutOctets: 25809000, ListenDrops: 3, ListenOverflows: 2},
			hasHost: true,
			progs: []progFigures{
				{name: "conn_tp_btf", runTime: 1234567 * time.Nanosecond, runCount: 11000},
				{name: "pkt_cg_egress", runTime: 19500 * time.Microsecond, runCount: 150061},
				{name: "pkt_cg_ingress", runTime: 16900 * time.Microsecond, runCount: 130060},
				{name: "retrans_tp_btf", runTime: 120 * time.Microsecond, runCount: 1234},
				{name: "rst_recv_tp_btf", runTime: 21 * time.Microsecond, runCount: 231},
				{name: "rst_sent_tp_btf", runTime: 2 * time.Microsecond, runCount: 17},
			},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := telemetry.New()
			p := &Probes{snap: tc.snap}
			describe(reg)
			reg.Set().RegisterMetricsWriter(p.writeMetrics)
			var got bytes.Buffer
			reg.WritePrometheus(&got)

			checkGolden(t, "testdata/metrics-"+tc.name+".golden", got.Bytes())
		})
	}
}

// The lifetime buckets are declared twice, in probes.bpf.c and here.
func TestLifetimeBoundsMatchTheKernelBuckets(t *testing.T) {
	var c bpfCounters
	if got, want := len(lifetimeBounds)+1, len(c.Lifetime); got != want {
		t.Fatalf("%d bounds + Inf in metrics.go, %d buckets in probes.bpf.c", got-1, want)
	}
	if !slices.IsSorted(lifetimeBounds) {
		t.Fatal("lifetimeBounds are not increasing")
	}
}

func checkGolden(t *testing.T, path string, got []byte) {
	t.Helper()
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("/metrics differs from %s (go test -update rewrites it after a deliberate change):\n--- got\n%s\n--- want\n%s", path, got, want)
	}
}

// /proc mode end to end: a fixture /proc (ESTABLISHED sockets on :80 over
// IPv4 and IPv6, next to a listener, a TIME_WAIT, a CLOSE_WAIT and a client
// whose remote port is 80) through refresh to the /metrics text.
func TestProcModeMetricsFromFixtureProc(t *testing.T) {
	reg := telemetry.New()
	p := &Probes{
		procRoot: "testdata/proc",
		log:      slog.New(slog.NewTextHandler(io.Discard, nil)),
		modes:    map[string]string{ProbeConn: ModeProc, ProbePackets: ModeNone, ProbeTCPEvents: ModeNone},
		ports:    []uint16{80, 443, 8080},
	}
	p.refresh()
	describe(reg)
	reg.Set().RegisterMetricsWriter(p.writeMetrics)
	var got bytes.Buffer
	reg.WritePrometheus(&got)
	checkGolden(t, "testdata/metrics-procfs.golden", got.Bytes())
	for _, want := range []string{
		`pushrelay_tcp_established_connections{port="80"} 3` + "\n",
		`pushrelay_tcp_established_connections{port="443"} 1` + "\n",
		`pushrelay_tcp_established_connections{port="8080"} 0` + "\n",
	} {
		if !bytes.Contains(got.Bytes(), []byte(want)) {
			t.Errorf("missing %q", want)
		}
	}
}
