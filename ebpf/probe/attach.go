package probe

import (
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// Modes of the two probes, as pushrelay_probe_mode reports them.
const (
	ModeTpBTF      = "tp_btf"
	ModeRawTp      = "raw_tp"
	ModeTracepoint = "tracepoint"
	ModeCgroupSKB  = "cgroup_skb"
	ModeTCX        = "tcx"
	ModeProc       = "proc" // conn: /proc/net/tcp polling, no eBPF
	ModeNone       = "none" // packets: no per-port figures at all
	ModeDisabled   = "disabled"
)

// Probe names, the keys of Modes. tcp_events is the reset and retransmit
// programs, attached together in one mode so that one line says where they
// stand.
const (
	ProbeConn      = "conn"
	ProbePackets   = "packets"
	ProbeTCPEvents = "tcp_events"
)

// kernel holds what was loaded into the kernel: the shared maps and the
// programs and links of whichever modes attached.
type kernel struct {
	ports *ebpf.Map // u16 port → u32 slot
	stats *ebpf.Map // per-CPU counters by slot
	estAt *ebpf.Map // socket → when it was accepted, for the lifetime histogram
	progs map[string]*ebpf.Program
	links []link.Link
	cg    cgroupLinks // cgroup_skb mode only
	ncpu  int
}

func (k *kernel) close() error {
	var errs []error
	for i := len(k.links) - 1; i >= 0; i-- {
		errs = append(errs, k.links[i].Close())
	}
	errs = append(errs, k.cg.close())
	for _, p := range k.progs {
		errs = append(errs, p.Close())
	}
	if k.ports != nil {
		errs = append(errs, k.ports.Close())
	}
	if k.stats != nil {
		errs = append(errs, k.stats.Close())
	}
	if k.estAt != nil {
		errs = append(errs, k.estAt.Close())
	}
	return errors.Join(errs...)
}

// loadSpec returns the embedded object with the netns filter set.
func loadSpec(netns uint32) (*ebpf.CollectionSpec, error) {
	spec, err := loadBpf()
	if err != nil {
		return nil, err
	}
	if err := spec.Variables[bpfVarNetnsIno].Set(netns); err != nil {
		return nil, fmt.Errorf("set netns_ino: %w", err)
	}
	return spec, nil
}

// loadMaps creates the maps every program shares. Failing here means no
// eBPF at all for this process.
func loadMaps(spec *ebpf.CollectionSpec) (*kernel, error) {
	// A no-op on kernels ≥ 5.11, which charge BPF memory to the cgroup; an
	// error here only matters on older kernels, where map creation says so.
	_ = rlimit.RemoveMemlock()
	var maps bpfMaps
	if err := spec.LoadAndAssign(&maps, nil); err != nil {
		return nil, fmt.Errorf("create maps: %s", explain(err, capBPF))
	}
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		maps.Close()
		return nil, fmt.Errorf("possible CPUs: %w", err)
	}
	return &kernel{ports: maps.Ports, stats: maps.Stats, estAt: maps.EstAt, progs: map[string]*ebpf.Program{}, ncpu: ncpu}, nil
}

// loadProg loads one program of spec against the already created maps.
func (k *kernel) loadProg(spec *ebpf.CollectionSpec, cache *btf.Cache, name string) (*ebpf.Program, error) {
	one := spec.Copy()
	one.Programs = map[string]*ebpf.ProgramSpec{name: spec.Programs[name]}
	coll, err := ebpf.NewCollectionWithOptions(one, ebpf.CollectionOptions{
		MapReplacements: map[string]*ebpf.Map{bpfMapPorts: k.ports, bpfMapStats: k.stats, bpfMapEstAt: k.estAt},
		Cache:           cache,
	})
	if err != nil {
		return nil, fmt.Errorf("load: %w", err)
	}
	defer coll.Close()
	prog := coll.DetachProgram(name)
	k.progs[name] = prog
	return prog, nil
}

func (k *kernel) dropProg(name string) {
	if p := k.progs[name]; p != nil {
		p.Close()
		delete(k.progs, name)
	}
}

// attachConn attaches the first connection program this kernel and these
// privileges allow, and returns its mode with the reasons of those that
// did not attach.
func (k *kernel) attachConn(spec *ebpf.CollectionSpec, cache *btf.Cache, skip map[string]bool) (mode string, why []string) {
	type attempt struct {
		mode, prog string
		needs      []int
		attach     func(*ebpf.Program) (link.Link, error)
	}
	attempts := []attempt{
		{ModeTpBTF, bpfProgConnTpBtf, []int{capBPF, capPerfmon}, func(p *ebpf.Program) (link.Link, error) {
			return link.AttachTracing(link.TracingOptions{Program: p, AttachType: ebpf.AttachTraceRawTp})
		}},
		{ModeRawTp, bpfProgConnRawTp, []int{capBPF, capPerfmon}, func(p *ebpf.Program) (link.Link, error) {
			return link.AttachRawTracepoint(link.RawTracepointOptions{Name: "inet_sock_set_state", Program: p})
		}},
		{ModeTracepoint, bpfProgConnTracepoint, []int{capBPF, capPerfmon}, func(p *ebpf.Program) (link.Link, error) {
			return link.Tracepoint("sock", "inet_sock_set_state", p, nil)
		}},
	}
	for _, a := range attempts {
		if skip[a.mode] {
			why = append(why, a.mode+": skipped")
			continue
		}
		prog, err := k.loadProg(spec, cache, a.prog)
		if err != nil {
			why = append(why, a.mode+": "+explain(err, a.needs...))
			continue
		}
		l, err := a.attach(prog)
		if err != nil {
			k.dropProg(a.prog)
			why = append(why, a.mode+": attach: "+explain(err, a.needs...))
			continue
		}
		k.links = append(k.links, l)
		return a.mode, why
	}
	return ModeProc, why
}

// tcpEventHooks are the tracepoints of the tcp_events probe and their
// program in each mode.
var tcpEventHooks = []struct {
	tracepoint, tpBTF, rawTp, classic string
}{
	{"tcp_send_reset", bpfProgRstSentTpBtf, bpfProgRstSentRawTp, bpfProgRstSentTracepoint},
	{"tcp_receive_reset", bpfProgRstRecvTpBtf, bpfProgRstRecvRawTp, bpfProgRstRecvTracepoint},
	{"tcp_retransmit_skb", bpfProgRetransTpBtf, bpfProgRetransRawTp, bpfProgRetransTracepoint},
}

// attachTCPEvents attaches the reset and retransmit programs, all three in
// the first mode that takes every one of them: counts of one kind from
// one mode and of another from a different one would be fine, but a
// partial set would read as "no resets" where nothing was watching.
func (k *kernel) attachTCPEvents(spec *ebpf.CollectionSpec, cache *btf.Cache, skip map[string]bool) (mode string, why []string) {
	modes := []struct {
		mode   string
		prog   func(i int) string
		attach func(tp string, p *ebpf.Program) (link.Link, error)
	}{
		{ModeTpBTF, func(i int) string { return tcpEventHooks[i].tpBTF }, func(_ string, p *ebpf.Program) (link.Link, error) {
			return link.AttachTracing(link.TracingOptions{Program: p, AttachType: ebpf.AttachTraceRawTp})
		}},
		{ModeRawTp, func(i int) string { return tcpEventHooks[i].rawTp }, func(tp string, p *ebpf.Program) (link.Link, error) {
			return link.AttachRawTracepoint(link.RawTracepointOptions{Name: tp, Program: p})
		}},
		{ModeTracepoint, func(i int) string { return tcpEventHooks[i].classic }, func(tp string, p *ebpf.Program) (link.Link, error) {
			return link.Tracepoint("tcp", tp, p, nil)
		}},
	}
	for _, m := range modes {
		if skip[m.mode] {
			why = append(why, m.mode+": skipped")
			continue
		}
		var links []link.Link
		var failed error
		for i, h := range tcpEventHooks {
			prog, err := k.loadProg(spec, cache, m.prog(i))
			if err != nil {
				failed = fmt.Errorf("%s: %s", h.tracepoint, explain(err, capBPF, capPerfmon))
				break
			}
			l, err := m.attach(h.tracepoint, prog)
			if err != nil {
				failed = fmt.Errorf("%s: attach: %s", h.tracepoint, explain(err, capBPF, capPerfmon))
				break
			}
			links = append(links, l)
		}
		if failed == nil {
			k.links = append(k.links, links...)
			return m.mode, why
		}
		for _, l := range links {
			l.Close()
		}
		for i := range tcpEventHooks {
			k.dropProg(m.prog(i))
		}
		why = append(why, m.mode+": "+failed.Error())
	}
	return ModeNone, why
}

// attachPackets attaches the ingress/egress pair: cgroup_skb on Nginx's
// cgroup, else tcx on every interface of this network namespace.
func (k *kernel) attachPackets(spec *ebpf.CollectionSpec, cache *btf.Cache, cgroup string, skip map[string]bool) (mode string, why []string) {
	attempts := []struct {
		mode   string
		attach func() error
	}{
		{ModeCgroupSKB, func() error { return k.attachCgroupSKB(spec, cache, cgroup) }},
		{ModeTCX, func() error { return k.attachTCX(spec, cache) }},
	}
	for _, a := range attempts {
		if skip[a.mode] {
			why = append(why, a.mode+": skipped")
			continue
		}
		if err := a.attach(); err != nil {
			why = append(why, a.mode+": "+err.Error())
			continue
		}
		return a.mode, why
	}
	return ModeNone, why
}

func (k *kernel) attachCgroupSKB(spec *ebpf.CollectionSpec, cache *btf.Cache, cgroup string) error {
	if cgroup == "" {
		return errors.New("no cgroup configured")
	}
	var st unix.Statfs_t
	if err := unix.Statfs(cgroup, &st); err != nil {
		return fmt.Errorf("cgroup %s: %w", cgroup, err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		return fmt.Errorf("%s is not on a cgroup v2 mount", cgroup)
	}
	for _, name := range []string{bpfProgPktCgIngress, bpfProgPktCgEgress} {
		if _, err := k.loadProg(spec, cache, name); err != nil {
			k.dropProg(bpfProgPktCgIngress)
			return fmt.Errorf("%s", explain(err, capBPF, capNetAdmin))
		}
	}
	k.cg.path = cgroup
	if err := k.linkCgroup(); err != nil {
		k.dropProg(bpfProgPktCgIngress)
		k.dropProg(bpfProgPktCgEgress)
		return err
	}
	return nil
}

// cgroupLinks are the cgroup_skb links and the cgroup directory they hold:
// systemd removes and recreates a service's cgroup when the service
// restarts, which detaches the programs, so the inode is watched.
type cgroupLinks struct {
	path  string
	ino   uint64
	links []link.Link
}

func (c *cgroupLinks) close() error {
	var errs []error
	for _, l := range c.links {
		errs = append(errs, l.Close())
	}
	c.links, c.ino = nil, 0
	return errors.Join(errs...)
}

// linkCgroup attaches the loaded cgroup_skb programs to k.cg.path.
func (k *kernel) linkCgroup() error {
	var st unix.Stat_t
	if err := unix.Stat(k.cg.path, &st); err != nil {
		return fmt.Errorf("cgroup %s: %w", k.cg.path, err)
	}
	for _, d := range []struct {
		prog   string
		attach ebpf.AttachType
	}{{bpfProgPktCgIngress, ebpf.AttachCGroupInetIngress}, {bpfProgPktCgEgress, ebpf.AttachCGroupInetEgress}} {
		l, err := link.AttachCgroup(link.CgroupOptions{Path: k.cg.path, Attach: d.attach, Program: k.progs[d.prog]})
		if err != nil {
			k.cg.close()
			return fmt.Errorf("attach: %s", explain(err, capBPF, capNetAdmin))
		}
		k.cg.links = append(k.cg.links, l)
	}
	k.cg.ino = st.Ino
	return nil
}

// followCgroup re-attaches the cgroup_skb programs when the cgroup directory
// was replaced (or comes back) since they were attached. It reports whether
// it did anything.
func (k *kernel) followCgroup() (changed bool, err error) {
	var st unix.Stat_t
	if err := unix.Stat(k.cg.path, &st); err != nil {
		if k.cg.ino == 0 {
			return false, nil // still gone
		}
		k.cg.close()
		return true, fmt.Errorf("cgroup %s: %w", k.cg.path, err)
	}
	if st.Ino == k.cg.ino {
		return false, nil
	}
	k.cg.close()
	return true, k.linkCgroup()
}

// attachTCX covers the interfaces that exist now; one created later (a new
// VLAN, say) is not covered until the relay restarts.
func (k *kernel) attachTCX(spec *ebpf.CollectionSpec, cache *btf.Cache) error {
	ifaces, err := net.Interfaces()
	if err != nil {
		return fmt.Errorf("list interfaces: %w", err)
	}
	in, err := k.loadProg(spec, cache, bpfProgPktTcxIngress)
	if err != nil {
		return fmt.Errorf("%s", explain(err, capBPF, capNetAdmin))
	}
	out, err := k.loadProg(spec, cache, bpfProgPktTcxEgress)
	if err != nil {
		k.dropProg(bpfProgPktTcxIngress)
		return fmt.Errorf("%s", explain(err, capBPF, capNetAdmin))
	}
	var links []link.Link
	fail := func(err error) error {
		for _, l := range links {
			l.Close()
		}
		k.dropProg(bpfProgPktTcxIngress)
		k.dropProg(bpfProgPktTcxEgress)
		return fmt.Errorf("attach: %s", explain(err, capBPF, capNetAdmin))
	}
	for _, ifc := range ifaces {
		if ifc.Flags&net.FlagUp == 0 {
			continue
		}
		for _, d := range []struct {
			prog   *ebpf.Program
			attach ebpf.AttachType
		}{{in, ebpf.AttachTCXIngress}, {out, ebpf.AttachTCXEgress}} {
			l, err := link.AttachTCX(link.TCXOptions{Interface: ifc.Index, Program: d.prog, Attach: d.attach})
			if err != nil {
				return fail(fmt.Errorf("%s: %w", ifc.Name, err))
			}
			links = append(links, l)
		}
	}
	if len(links) == 0 {
		return fail(errors.New("no interface is up"))
	}
	k.links = append(k.links, links...)
	return nil
}

// netnsInode is the inode of the calling process's network namespace, the
// tracepoint filter that keeps other namespaces' connections out.
func netnsInode() (uint32, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &st); err != nil {
		return 0, fmt.Errorf("netns inode: %w", err)
	}
	return uint32(st.Ino), nil
}

// enableRunStats turns on the kernel's per-program run time accounting for
// as long as the returned closer is open. It needs CAP_SYS_ADMIN; without it
// the figures stay zero unless kernel.bpf_stats_enabled is set.
func enableRunStats() (func() error, error) {
	c, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		if b, rerr := os.ReadFile("/proc/sys/kernel/bpf_stats_enabled"); rerr == nil && len(b) > 0 && b[0] == '1' {
			return func() error { return nil }, nil
		}
		return nil, err
	}
	return c.Close, nil
}
