package probe

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/pushrelay/pushrelay/sidecar/telemetry"
)

// maxPorts is the number of counter slots in the kernel maps (MAX_PORTS in
// probes.bpf.c).
const maxPorts = 64

// Config is what the probes watch.
type Config struct {
	Ports    []uint16      // Nginx's client-facing local ports
	Cgroup   string        // Nginx's cgroup v2 directory, for cgroup_skb
	Interval time.Duration // how often counters are read and /proc polled
}

func (c Config) validate() error {
	if c.Interval <= 0 {
		return fmt.Errorf("probes: interval must be positive, got %s", c.Interval)
	}
	return validatePorts(c.Ports)
}

func validatePorts(ports []uint16) error {
	if slices.Contains(ports, 0) {
		return errors.New("probes: port 0 is not a port")
	}
	if n := len(uniquePorts(ports)); n > maxPorts {
		return fmt.Errorf("probes: at most %d ports, got %d", maxPorts, n)
	}
	return nil
}

func uniquePorts(ports []uint16) []uint16 {
	out := slices.Clone(ports)
	slices.Sort(out)
	return slices.Compact(out)
}

// Probes counts connections, packets and bytes of the watched ports and
// exposes them on the registry it was started with.
type Probes struct {
	log      *slog.Logger
	interval time.Duration
	procRoot string
	modes    map[string]string // fixed at Start
	k        *kernel           // nil when not even the maps could be created
	stopRun  func() error      // ends kernel run-time accounting, if we turned it on

	cancel    context.CancelFunc
	done      chan struct{}
	closeOnce sync.Once
	closeErr  error

	mu    sync.Mutex // ports, slots and seeds; held while SetPorts runs
	ports []uint16
	slots map[uint16]uint32
	free  []uint32
	seeds map[uint16]seed

	procEst   map[uint16]int64 // proc mode: the last scan, its ports, the next one due
	procPorts []uint16
	procNext  time.Time

	snapMu sync.Mutex // the figures /metrics writes
	snap   snapshot

	silentMu sync.Mutex // refresh's silence check, see silence
	quiet    map[uint16]quietPort
	silent   bool
}

// quietPort is the silence check's memory of one port: its counts at the
// last read and how many reads in a row accepted connections without a
// packet.
type quietPort struct {
	accepted, packets uint64
	reads             int
}

// silentAfter is how many reads in a row must see a port accept connections
// while its packet counts stand still before the packet probe is called
// silent. Every accepted connection has counted segments (its SYN, its final
// ACK) when the probe works; one read can still see the accept before the
// segments, as the per-CPU slots are copied one CPU after another, but not
// several in a row.
const silentAfter = 3

// seed anchors the established gauge of one port: the ESTABLISHED sockets
// /proc showed when the port was added, and the kernel's est_up−est_down at
// that moment (the midpoint of readings before and after the /proc scan, so
// connections that came or went during the scan err by half on either side).
type seed struct {
	base int64
	ref  float64
}

// Start loads and attaches what this kernel and these privileges allow,
// falling back to older hooks and then to /proc. It returns an error only for
// a bad Config; a missing privilege or an old kernel is a mode, logged once
// per probe with the reason.
func Start(ctx context.Context, cfg Config, reg *telemetry.Registry, log *slog.Logger) (*Probes, error) {
	return start(ctx, cfg, reg, log, startOptions{})
}

// startOptions let tests force a fallback the running kernel would not take.
type startOptions struct {
	skip map[string]bool // modes not to try
}

func start(ctx context.Context, cfg Config, reg *telemetry.Registry, log *slog.Logger, opts startOptions) (*Probes, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	p := &Probes{
		log:      log,
		interval: cfg.Interval,
		procRoot: "/proc",
		modes:    map[string]string{ProbeConn: ModeProc, ProbePackets: ModeNone, ProbeTCPEvents: ModeNone},
		slots:    map[uint16]uint32{},
		seeds:    map[uint16]seed{},
	}
	for i := maxPorts - 1; i >= 0; i-- {
		p.free = append(p.free, uint32(i))
	}
	p.attach(cfg, opts.skip)
	p.mu.Lock()
	err := p.applyPorts(cfg.Ports)
	p.mu.Unlock()
	if err != nil {
		// Only a failing map update or /proc read gets here; the figures
		// of the ports that did apply are still worth serving.
		log.Warn("probes: watching ports", "err", err)
	}
	p.refresh()
	describe(reg)
	reg.Set().RegisterMetricsWriter(p.writeMetrics)

	ctx, p.cancel = context.WithCancel(ctx)
	p.done = make(chan struct{})
	go p.poll(ctx)
	return p, nil
}

// attach loads the maps and the programs, and logs one line per probe.
func (p *Probes) attach(cfg Config, skip map[string]bool) {
	netns, err := netnsInode()
	if err != nil {
		// Without the inode the filter would drop everything; counting every
		// namespace is the lesser error, and the log says so.
		p.log.Warn("probes: counting connections of every network namespace", "err", err)
		netns = 0
	}
	var connWhy, pktWhy, evWhy []string
	spec, err := loadSpec(netns)
	if err == nil {
		p.k, err = loadMaps(spec)
	}
	if err != nil {
		connWhy = []string{err.Error()}
		pktWhy, evWhy = connWhy, connWhy
	} else {
		cache := btf.NewCache()
		p.modes[ProbeConn], connWhy = p.k.attachConn(spec, cache, skip)
		p.modes[ProbePackets], pktWhy = p.k.attachPackets(spec, cache, cfg.Cgroup, skip)
		p.modes[ProbeTCPEvents], evWhy = p.k.attachTCPEvents(spec, cache, skip)
		if stop, err := enableRunStats(); err == nil {
			p.stopRun = stop
		} else {
			p.log.Info("probes: program run time stays 0: kernel.bpf_stats_enabled is off and enabling it needs CAP_SYS_ADMIN", "err", err)
		}
	}
	p.logMode(ProbeConn, connWhy)
	p.logMode(ProbePackets, pktWhy)
	p.logMode(ProbeTCPEvents, evWhy)
}

func (p *Probes) logMode(probe string, why []string) {
	mode := p.modes[probe]
	if len(why) == 0 {
		p.log.Info("probes: attached", "probe", probe, "mode", mode)
		return
	}
	p.log.Warn("probes: fell back", "probe", probe, "mode", mode, "why", strings.Join(why, "; "))
}

// connInKernel tells whether connection counters come from eBPF.
func (p *Probes) connInKernel() bool { return p.modes[ProbeConn] != ModeProc }

// SetPorts changes the watched ports at runtime, as a config reload does.
// A port that stays keeps its counters; a new one starts at zero with its
// established gauge seeded from /proc.
func (p *Probes) SetPorts(ports []uint16) error {
	if err := validatePorts(ports); err != nil {
		return err
	}
	p.mu.Lock()
	err := p.applyPorts(ports)
	p.mu.Unlock()
	p.refresh()
	return err
}

// applyPorts makes the kernel's port map and the seeds match ports. p.mu is
// held.
func (p *Probes) applyPorts(ports []uint16) error {
	want := uniquePorts(ports)
	var added []uint16
	for _, port := range p.ports {
		if slices.Contains(want, port) {
			continue
		}
		if p.k != nil {
			if err := p.k.ports.Delete(port); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("unwatch port %d: %w", port, err)
			}
			p.free = append(p.free, p.slots[port])
		}
		delete(p.slots, port)
		delete(p.seeds, port)
	}
	for _, port := range want {
		if !slices.Contains(p.ports, port) {
			added = append(added, port)
		}
	}
	p.ports = want
	if p.k == nil || len(added) == 0 {
		return nil
	}
	zero := make([]bpfCounters, p.k.ncpu)
	for _, port := range added {
		slot := p.free[len(p.free)-1]
		// A reused slot still holds the counts of the port it served.
		if err := p.k.stats.Put(slot, zero); err != nil {
			return fmt.Errorf("watch port %d: reset slot: %w", port, err)
		}
		if err := p.k.ports.Put(port, slot); err != nil {
			return fmt.Errorf("watch port %d: %w", port, err)
		}
		p.free = p.free[:len(p.free)-1]
		p.slots[port] = slot
	}
	if !p.connInKernel() {
		return nil
	}
	return p.seed(added)
}

// seed reads the established sockets of the new ports from /proc, right
// after their slots went live.
func (p *Probes) seed(ports []uint16) error {
	before, err := p.readSlots(ports)
	if err != nil {
		return err
	}
	set := make(map[uint16]bool, len(ports))
	for _, port := range ports {
		set[port] = true
	}
	counts, err := countEstablished(p.procRoot, set)
	if err != nil {
		return fmt.Errorf("seed established gauge: %w", err)
	}
	after, err := p.readSlots(ports)
	if err != nil {
		return err
	}
	for _, port := range ports {
		b, a := before[port], after[port]
		ref := (float64(b.EstUp) - float64(b.EstDown) + float64(a.EstUp) - float64(a.EstDown)) / 2
		p.seeds[port] = seed{base: counts[port], ref: ref}
	}
	return nil
}

// readSlots sums the per-CPU counters of each port's slot.
func (p *Probes) readSlots(ports []uint16) (map[uint16]bpfCounters, error) {
	out := make(map[uint16]bpfCounters, len(ports))
	percpu := make([]bpfCounters, p.k.ncpu)
	for _, port := range ports {
		if err := p.k.stats.Lookup(p.slots[port], &percpu); err != nil {
			return nil, fmt.Errorf("read counters of port %d: %w", port, err)
		}
		var sum bpfCounters
		for i := range percpu {
			sum.add(&percpu[i])
		}
		out[port] = sum
	}
	return out, nil
}

// Modes returns probe → mode, e.g. {"conn": "tp_btf", "packets": "cgroup_skb"}.
func (p *Probes) Modes() map[string]string {
	out := make(map[string]string, len(p.modes))
	for k, v := range p.modes {
		out[k] = v
	}
	return out
}

// Close stops the poller and detaches every program. The metrics writer
// stays registered (the registry has no way to remove it) but writes nothing.
func (p *Probes) Close() error {
	p.closeOnce.Do(func() {
		p.cancel()
		<-p.done
		p.snapMu.Lock()
		p.snap = snapshot{}
		p.snapMu.Unlock()
		var errs []error
		if p.k != nil {
			errs = append(errs, p.k.close())
		}
		if p.stopRun != nil {
			errs = append(errs, p.stopRun())
		}
		p.closeErr = errors.Join(errs...)
	})
	return p.closeErr
}

func (p *Probes) poll(ctx context.Context) {
	defer close(p.done)
	t := time.NewTicker(p.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			p.refresh()
		}
	}
}

// procEstablished is the established gauge of proc mode. Listing a million
// sockets takes about a second of CPU, so scans are spaced to at least 20
// times their own duration (≤ 5 % of a CPU); a change of ports rescans.
func (p *Probes) procEstablished(ports []uint16) map[uint16]int64 {
	p.mu.Lock()
	due := !time.Now().Before(p.procNext) || !slices.Equal(p.procPorts, ports)
	cached := p.procEst
	p.mu.Unlock()
	if !due {
		return cached
	}
	set := make(map[uint16]bool, len(ports))
	for _, port := range ports {
		set[port] = true
	}
	start := time.Now()
	est, err := countEstablished(p.procRoot, set)
	if err != nil {
		p.log.Warn("probes: poll /proc", "err", err)
		return nil
	}
	p.mu.Lock()
	p.procEst, p.procPorts, p.procNext = est, ports, start.Add(max(p.interval, 20*time.Since(start)))
	p.mu.Unlock()
	return est
}

// refresh reads every figure once and swaps the snapshot /metrics writes.
func (p *Probes) refresh() {
	s := snapshot{modes: p.Modes()}
	p.mu.Lock()
	if p.k != nil && p.modes[ProbePackets] == ModeCgroupSKB {
		// Packets of a restarted Nginx are missed for at most an interval.
		if changed, err := p.k.followCgroup(); err != nil {
			p.log.Warn("probes: Nginx's cgroup went away; packets are not counted until it is back", "err", err)
		} else if changed {
			p.log.Info("probes: re-attached to Nginx's new cgroup", "cgroup", p.k.cg.path)
		}
	}
	ports := slices.Clone(p.ports)
	var counters map[uint16]bpfCounters
	var err error
	if p.k != nil {
		counters, err = p.readSlots(ports)
	}
	seeds := make(map[uint16]seed, len(p.seeds))
	for k, v := range p.seeds {
		seeds[k] = v
	}
	p.mu.Unlock()
	if err != nil {
		p.log.Warn("probes: read counters", "err", err)
	}
	s.packetsSilent = p.silence(counters)

	var est map[uint16]int64
	if !p.connInKernel() {
		est = p.procEstablished(ports)
	}
	for _, port := range ports {
		f := portFigures{port: port, c: counters[port]}
		if p.connInKernel() {
			sd := seeds[port]
			f.established = sd.base + int64(math.Round(float64(f.c.EstUp)-float64(f.c.EstDown)-sd.ref))
			f.hasEst = counters != nil
		} else if n, ok := est[port]; ok {
			f.established, f.hasEst = n, true
		}
		s.ports = append(s.ports, f)
	}
	if h, err := readHostFigures(p.procRoot); err == nil {
		s.host, s.hasHost = h, true
	} else {
		p.log.Warn("probes: read host figures", "err", err)
	}
	if p.k != nil {
		for name, prog := range p.k.progs {
			st, err := prog.Stats()
			if err != nil {
				continue
			}
			s.progs = append(s.progs, progFigures{name: name, runTime: st.Runtime, runCount: st.RunCount})
		}
		slices.SortFunc(s.progs, func(a, b progFigures) int { return strings.Compare(a.name, b.name) })
	}
	p.snapMu.Lock()
	p.snap = s
	p.snapMu.Unlock()
}

// add sums c into s, field by field.
func (s *bpfCounters) add(c *bpfCounters) {
	s.Accepted += c.Accepted
	s.Closed += c.Closed
	s.EstUp += c.EstUp
	s.EstDown += c.EstDown
	s.RxPackets += c.RxPackets
	s.RxBytes += c.RxBytes
	s.RxPayload += c.RxPayload
	s.TxPackets += c.TxPackets
	s.TxBytes += c.TxBytes
	s.TxPayload += c.TxPayload
	s.RstSent += c.RstSent
	s.RstReceived += c.RstReceived
	s.RetransSegs += c.RetransSegs
	s.LifetimeNs += c.LifetimeNs
	for i := range s.Lifetime {
		s.Lifetime[i] += c.Lifetime[i]
	}
}

// silence tells whether the packet probe counts nothing for ports that
// accept connections. That happens when Nginx's listening sockets were made
// outside the cgroup the cgroup_skb programs are attached to (Nginx started
// before the cgroup existed, or in another one): a socket keeps the cgroup
// it was made in, and so do the connections it accepts. Zeros would look
// like an idle frontend, so it is logged once and exposed instead.
func (p *Probes) silence(counters map[uint16]bpfCounters) bool {
	if counters == nil || !p.connInKernel() || p.modes[ProbePackets] == ModeNone {
		return false
	}
	p.silentMu.Lock()
	defer p.silentMu.Unlock()
	if p.quiet == nil {
		p.quiet = map[uint16]quietPort{}
	}
	var silentPorts []uint16
	for port, c := range counters {
		q, seen := p.quiet[port]
		pkts := c.RxPackets + c.TxPackets
		switch {
		case !seen || pkts != q.packets || c.Accepted < q.accepted:
			q.reads = 0 // counting, or a new or reset slot
		case c.Accepted > q.accepted:
			q.reads++
		}
		q.accepted, q.packets = c.Accepted, pkts
		p.quiet[port] = q
		if q.reads >= silentAfter {
			silentPorts = append(silentPorts, port)
		}
	}
	for port := range p.quiet {
		if _, ok := counters[port]; !ok {
			delete(p.quiet, port)
		}
	}
	silent := len(silentPorts) > 0
	switch {
	case silent && !p.silent:
		slices.Sort(silentPorts)
		where := "on the interfaces that were up at start"
		if p.modes[ProbePackets] == ModeCgroupSKB && p.k != nil {
			where = "in cgroup " + p.k.cg.path + " (were Nginx's listening sockets made before Nginx was moved into it? restart Nginx inside it)"
		}
		p.log.Warn("probes: packet counters stand still while connections are accepted: Nginx's sockets are not seen "+where, "ports", silentPorts, "reads", silentAfter)
	case !silent && p.silent:
		p.log.Info("probes: packets are counted again")
	}
	p.silent = silent
	return silent
}
