// Command ccproxy lets a ChatGPT Plus/Pro subscriber use the ChatGPT "Codex" backend from any
// OpenAI- or Anthropic-compatible tool: the SDKs, the Codex CLI, Claude Code, agents, editors.
//
// It logs in the way the Codex CLI does (OAuth2 PKCE), shares and refreshes the Codex CLI's
// credential file ($CODEX_HOME/auth.json) under a file lock, and serves the routes of newServer
// on 127.0.0.1:8000, translated to the backend's Responses API:
//
//	ccproxy auth login-openai          # once; opens a browser
//	ccproxy serve                      # listening on http://127.0.0.1:8000
//	curl -s localhost:8000/codex/v1/chat/completions \
//	  -d '{"model":"gpt-5.5","messages":[{"role":"user","content":"hi"}]}'
//
// Environment: CODEX_HOME (credential directory, default ~/.codex), CCPROXY_HOME (own state:
// config.json, sessions/, models.json; default the user config directory + /ccproxy), and one
// CCPROXY_* variable per serve flag (see `ccproxy help serve`). Precedence: flag, environment,
// config file, default.
package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	err := run(context.Background(), os.Args, os.Getenv, os.Stdin, os.Stdout, os.Stderr)
	os.Exit(exitCode(err, os.Stderr))
}

// exitError ends the program with code. A msg is a command-line mistake, printed with a
// pointer to `ccproxy help`; without one the message has already been printed.
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return cmp.Or(e.msg, fmt.Sprintf("exit status %d", e.code)) }

func exitStatus(code int) error { return &exitError{code: code} }

// usagef is a command-line mistake: exit status 2.
func usagef(format string, args ...any) error { return &exitError{2, fmt.Sprintf(format, args...)} }

// exitCode prints err the way the user should see it and returns the status. Messages follow
// age's rule: a "ccproxy:" prefix, lower case, no period.
func exitCode(err error, stderr io.Writer) int {
	var ee *exitError
	switch {
	case err == nil:
		return 0
	case !errors.As(err, &ee):
		fmt.Fprintf(stderr, "ccproxy: %s\n", err)
		return 1
	case ee.msg != "":
		fmt.Fprintf(stderr, "ccproxy: %s\nrun `ccproxy help` for usage\n", ee.msg)
	}
	return ee.code
}

const usage = `Usage: ccproxy COMMAND [flags]

Commands:
  serve [flags]                      run the proxy (default 127.0.0.1:8000)
  auth login-openai [flags]          log in with ChatGPT (browser, paste or device code)
  auth status [--json]               one line: logged in?, plan, token validity
  auth openai-info [--json]          plan, account, email, expiry, file, last refresh
  auth logout [--yes]                remove the tokens (shared with the Codex CLI)
  config codex --enable|--disable    turn the /codex routes on or off
  config show                        effective configuration and where each value came from
  usage [--json]                     the plan's rate-limit windows (5-hour, weekly), as bars
  version                            module and Go version
  help [serve|auth|config]           this text, or a command's flags

Run 'ccproxy help serve' for the serve flags and their environment variables.
`

const configUsage = `Usage:
  ccproxy config codex --enable|--disable   turn the /codex routes on or off
  ccproxy config show                       print each effective setting and its source
`

// setting is one serve option: its flag name (also the config-file key), environment
// variable, default and help.
type setting struct{ flag, env, def, help string }

// settings lists every serve option once. It drives precedence, the help and `config show`,
// so they cannot disagree.
var settings = []setting{
	{"host", "CCPROXY_HOST", "127.0.0.1", "bind address; a non-loopback address needs --api-key"},
	{"port", "CCPROXY_PORT", "8000", "port, 0 picks a free one"},
	{"api-key", "CCPROXY_API_KEY", "", `require "Authorization: Bearer KEY" or "x-api-key: KEY"`},
	{"upstream-url", "CCPROXY_UPSTREAM_URL", "https://chatgpt.com/backend-api/codex", "Codex backend base"},
	{"auth-url", "CCPROXY_AUTH_URL", "https://auth.openai.com", "OAuth issuer"},
	{"reasoning", "CCPROXY_REASONING", "tags", "how reasoning is shown: tags, field or none"},
	{"instructions", "CCPROXY_INSTRUCTIONS", "auto", "auto, catalog, none or file:PATH"},
	{"session-ttl", "CCPROXY_SESSION_TTL", "24h", "idle time before a session expires"},
	{"max-sessions", "CCPROXY_MAX_SESSIONS", "1000", "sessions kept at most"},
	{"max-session-bytes", "CCPROXY_MAX_SESSION_BYTES", "33554432", "transcript size cap"},
	{"max-connections", "CCPROXY_MAX_CONNECTIONS", "1024", "connections served at once"},
	{"image-model", "CCPROXY_IMAGE_MODEL", "gpt-5.5", "the model that draws for /images"},
	{"anthropic-models", "CCPROXY_ANTHROPIC_MODELS", "opus=gpt-6.1-sol,sonnet=gpt-6-sol,haiku=gpt-6-luna",
		"the Codex model of each claude-* family"},
	{"max-inflight-bytes", "CCPROXY_MAX_INFLIGHT_BYTES", "67108864",
		"bytes of request bodies held at once; beyond it a 503"},
	{"log-format", "CCPROXY_LOG_FORMAT", "text", "text or json"},
	{"log-level", "CCPROXY_LOG_LEVEL", "info", "debug, info, warn or error; debug logs bodies minus secrets"},
}

// serveUsage is built from settings, so the help lists every flag with its variable and default.
var serveUsage = serveHelp()

func serveHelp() string {
	var b strings.Builder
	b.WriteString("Usage: ccproxy serve [flags]\n\n" +
		"Every flag also comes from its environment variable, then from\n" +
		"$CCPROXY_HOME/config.json (key = flag name), then from the default.\n\n")
	for _, s := range settings {
		fmt.Fprintf(&b, "  --%-19s %s\n        %s", s.flag, s.env, s.help)
		if s.def != "" {
			fmt.Fprintf(&b, " (default %s)", s.def)
		}
		b.WriteString("\n")
	}
	b.WriteString("\nOther environment: CODEX_HOME (credential directory, default ~/.codex),\n" +
		"CCPROXY_HOME (state directory, default <user config dir>/ccproxy).\n")
	return b.String()
}

// config is the validated configuration of `serve`.
type config struct {
	host            string
	port            int
	apiKey          secret
	upstreamURL     string
	authURL         string
	reasoning       reasoningMode
	instructions    instructions
	sessionTTL      time.Duration
	maxSessions     int
	maxSessionBytes int64
	maxConnections  int
	claude          claudeModels  // the Codex model of each claude-* family
	imageModel      string        // the model that draws for the Images API
	maxInflight     int64         // bytes of request bodies held at once
	bodyTimeout     time.Duration // how long a request body may stall
	logFormat       string
	logLevel        slog.Level
	codexEnabled    bool
	home            string // $CCPROXY_HOME
	authPath        string // the shared credential file
	keepalive       time.Duration
}

// instructions is --instructions, parsed once: auto, catalog, none, or file:PATH with the
// file's text.
type instructions struct{ mode, path, text string }

func (in *instructions) UnmarshalText(b []byte) error {
	s := string(b)
	if path, ok := strings.CutPrefix(s, "file:"); ok {
		text, err := os.ReadFile(path)
		if err == nil {
			*in = instructions{"file", path, string(text)}
		}
		return err
	}
	if s != "auto" && s != "catalog" && s != "none" {
		return errors.New("want auto, catalog, none or file:PATH")
	}
	*in = instructions{mode: s}
	return nil
}

func (in instructions) MarshalText() ([]byte, error) {
	if in.mode == "file" {
		return []byte("file:" + in.path), nil
	}
	return []byte(in.mode), nil
}

// resolved is one setting's effective value and where it came from.
type resolved struct{ name, value, source string }

// run is the whole program; main only supplies the operating system.
func run(ctx context.Context, args []string, getenv func(string) string, stdin io.Reader,
	stdout, stderr io.Writer) error {
	if len(args) < 2 {
		fmt.Fprint(stderr, usage)
		return exitStatus(2)
	}
	home, err := stateDir(getenv)
	if err != nil {
		return err
	}
	file, err := readConfigFile(home)
	if err != nil {
		return err
	}
	cmd, rest := args[1], args[2:]
	switch cmd {
	case "serve":
		cfg, _, err := parseServe(rest, getenv, file, stderr)
		if err != nil {
			return err
		}
		cfg.home = home
		if cfg.authPath, err = authFilePath(getenv); err != nil {
			return err
		}
		return serve(ctx, cfg, stdout, stderr)
	case "auth":
		return runAuth(ctx, rest, settingsEnv(getenv, file), stdin, stdout, stderr)
	case "usage":
		return runUsage(ctx, rest, settingsEnv(getenv, file), stdout, stderr)
	case "config":
		return runConfig(rest, getenv, home, file, stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, versionString())
		return nil
	case "help", "-h", "-help", "--help":
		topic := ""
		if len(rest) > 0 {
			topic = rest[0]
		}
		text, ok := map[string]string{"": usage, "serve": serveUsage, "auth": authUsage,
			"config": configUsage}[topic]
		if !ok {
			return usagef("no help for %q", topic)
		}
		fmt.Fprint(stdout, text)
		return nil
	default:
		return usagef("unknown command %q", cmd)
	}
}

// settingsEnv is getenv with each serve setting resolved as serve would (environment, config
// file, default), so that `auth login-openai` honours an auth-url saved in the config file too.
func settingsEnv(getenv func(string) string, file configFile) func(string) string {
	return func(key string) string {
		i := slices.IndexFunc(settings, func(s setting) bool { return s.env == key })
		if i < 0 {
			return getenv(key)
		}
		return resolve(settings[i], getenv, file).value
	}
}

// resolve finds the value of s that no flag gave.
func resolve(s setting, getenv func(string) string, file configFile) resolved {
	if v := getenv(s.env); v != "" {
		return resolved{s.flag, v, "env " + s.env}
	}
	if v := file[s.flag]; v != "" {
		return resolved{s.flag, v, "config file"}
	}
	return resolved{s.flag, s.def, "default"}
}

// configFile is $CCPROXY_HOME/config.json as text: serve settings by flag name, and
// codex_enabled as `ccproxy config codex` writes it.
type configFile map[string]string

func readConfigFile(home string) (configFile, error) {
	path := filepath.Join(home, "config.json")
	raw, err := readConfigJSON(path)
	if err != nil {
		return nil, err
	}
	cf := configFile{}
	for k, v := range raw {
		_, isBool := v.(bool)
		isSetting := slices.ContainsFunc(settings, func(s setting) bool { return s.flag == k })
		switch {
		case k == "codex_enabled" && !isBool:
			return nil, fmt.Errorf("config %s: codex_enabled must be true or false", path)
		case k != "codex_enabled" && !isSetting:
			return nil, fmt.Errorf("config %s: unknown key %q (keys are serve flag names, "+
				"see `ccproxy help serve`)", path, k)
		}
		switch v.(type) {
		case string, float64, bool:
			cf[k] = fmt.Sprint(v)
		default:
			return nil, fmt.Errorf("config %s: %s must be a string or number", path, k)
		}
	}
	return cf, nil
}

// readConfigJSON reads the config file at path; a missing file is empty.
func readConfigJSON(path string) (map[string]any, error) {
	raw := map[string]any{}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return raw, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read config %s: %w", path, err)
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return nil, fmt.Errorf("config %s is not valid JSON (fix or remove it): %w", path, err)
	}
	return raw, nil
}

// parseServe resolves every setting (flag > env > config file > default) and validates it. The
// resolved values come back even when one is invalid, so `config show` can display them.
func parseServe(args []string, getenv func(string) string, file configFile,
	stderr io.Writer) (config, []resolved, error) {
	cfg := config{codexEnabled: file["codex_enabled"] != "false", keepalive: keepaliveInterval,
		bodyTimeout: 30 * time.Second}
	fs := flag.NewFlagSet("ccproxy serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, serveUsage) }
	fs.StringVar(&cfg.host, "host", "", "")
	fs.IntVar(&cfg.port, "port", 0, "")
	fs.StringVar((*string)(&cfg.apiKey), "api-key", "", "")
	fs.StringVar(&cfg.upstreamURL, "upstream-url", "", "")
	fs.StringVar(&cfg.authURL, "auth-url", "", "")
	fs.TextVar(&cfg.reasoning, "reasoning", reasoningTags, "")
	fs.TextVar(&cfg.instructions, "instructions", instructions{mode: "auto"}, "")
	fs.DurationVar(&cfg.sessionTTL, "session-ttl", 0, "")
	fs.IntVar(&cfg.maxSessions, "max-sessions", 0, "")
	fs.Int64Var(&cfg.maxSessionBytes, "max-session-bytes", 0, "")
	fs.IntVar(&cfg.maxConnections, "max-connections", 0, "")
	fs.TextVar(&cfg.claude, "anthropic-models", claudeModels{}, "")
	fs.StringVar(&cfg.imageModel, "image-model", "", "")
	fs.Int64Var(&cfg.maxInflight, "max-inflight-bytes", 0, "")
	fs.StringVar(&cfg.logFormat, "log-format", "", "")
	fs.TextVar(&cfg.logLevel, "log-level", slog.LevelInfo, "")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return cfg, nil, exitStatus(0)
		}
		return cfg, nil, exitStatus(2) // fs has printed the error
	}
	if fs.NArg() > 0 {
		return cfg, nil, usagef("serve takes no arguments, got %q", fs.Arg(0))
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var all []resolved
	var bad error
	for _, s := range settings {
		r := resolved{s.flag, fs.Lookup(s.flag).Value.String(), "flag --" + s.flag}
		if !set[s.flag] {
			r = resolve(s, getenv, file)
			if err := fs.Set(s.flag, r.value); err != nil && bad == nil {
				bad = usagef("invalid --%s %q (from %s): %v", s.flag, r.value, r.source, err)
			}
		}
		all = append(all, r)
	}
	cfg.upstreamURL = strings.TrimRight(cfg.upstreamURL, "/")
	cfg.authURL = strings.TrimRight(cfg.authURL, "/")
	if bad == nil {
		bad = checkServe(&cfg, all)
	}
	return cfg, all, bad
}

// checkServe validates what the flag types do not.
func checkServe(cfg *config, all []resolved) error {
	bad := func(name, want string) error {
		i := slices.IndexFunc(all, func(r resolved) bool { return r.name == name })
		return usagef("invalid --%s %q (from %s): want %s", name, all[i].value, all[i].source, want)
	}
	switch {
	case cfg.port < 0 || cfg.port > 65535:
		return bad("port", "a number from 0 to 65535")
	case !strings.HasPrefix(cfg.upstreamURL, "http://") && !strings.HasPrefix(cfg.upstreamURL, "https://"):
		return bad("upstream-url", "an http:// or https:// URL")
	case !strings.HasPrefix(cfg.authURL, "http://") && !strings.HasPrefix(cfg.authURL, "https://"):
		return bad("auth-url", "an http:// or https:// URL")
	case cfg.sessionTTL <= 0:
		return bad("session-ttl", "a positive duration such as 24h or 90m")
	case cfg.maxSessions < 1:
		return bad("max-sessions", "a positive number")
	case cfg.maxSessionBytes < 1:
		return bad("max-session-bytes", "a positive number of bytes")
	case cfg.maxConnections < 1:
		return bad("max-connections", "a positive number")
	case cfg.maxInflight < maxBodyBytes:
		return bad("max-inflight-bytes", fmt.Sprintf("at least the body cap, %d", maxBodyBytes))
	case cfg.logFormat != "text" && cfg.logFormat != "json":
		return bad("log-format", "text or json")
	}
	return nil
}

// isLoopback reports whether a Host names only this machine. Names compare case-insensitively,
// and a trailing dot makes no difference (RFC 1034, section 3.1).
func isLoopback(host string) bool {
	host = strings.ToLower(strings.TrimSuffix(strings.TrimSuffix(strings.TrimPrefix(host, "["), "]"), "."))
	if host == "localhost" || strings.HasSuffix(host, ".localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func stateDir(getenv func(string) string) (string, error) {
	if d := getenv("CCPROXY_HOME"); d != "" {
		return d, nil
	}
	d, err := os.UserConfigDir()
	if err != nil {
		return "", fmt.Errorf("find the config directory (set CCPROXY_HOME): %w", err)
	}
	return filepath.Join(d, "ccproxy"), nil
}

func runConfig(args []string, getenv func(string) string, home string, file configFile,
	stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return usagef("config needs a subcommand: codex or show")
	}
	switch args[0] {
	case "codex":
		fs := flag.NewFlagSet("ccproxy config codex", flag.ContinueOnError)
		fs.SetOutput(stderr)
		fs.Usage = func() { fmt.Fprint(stderr, configUsage) }
		enable := fs.Bool("enable", false, "")
		disable := fs.Bool("disable", false, "")
		if err := fs.Parse(args[1:]); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil
			}
			return exitStatus(2)
		}
		if *enable == *disable {
			return usagef("config codex needs exactly one of --enable or --disable")
		}
		if err := writeConfigFile(home, "codex_enabled", *enable); err != nil {
			return err
		}
		state := map[bool]string{true: "enabled", false: "disabled"}[*enable]
		fmt.Fprintf(stdout, "/codex routes %s in %s (restart a running serve to apply)\n",
			state, filepath.Join(home, "config.json"))
		return nil
	case "show":
		return configShow(getenv, home, file, stdout)
	default:
		return usagef("unknown config subcommand %q: use codex or show", args[0])
	}
}

// configShow prints every setting, valid or not, then reports the first invalid one.
func configShow(getenv func(string) string, home string, file configFile, stdout io.Writer) error {
	_, all, err := parseServe(nil, getenv, file, io.Discard)
	if all == nil {
		return err
	}
	source := func(env string) string {
		if getenv(env) != "" {
			return "env " + env
		}
		return "default"
	}
	authPath, _ := authFilePath(getenv)
	codex := resolved{"codex", "true", "default"}
	if v := file["codex_enabled"]; v != "" {
		codex.value, codex.source = v, "config file"
	}
	all = append(all, codex,
		resolved{"ccproxy-home", home, source("CCPROXY_HOME")},
		resolved{"auth-file", authPath, source("CODEX_HOME")})
	for _, r := range all {
		if r.name == "api-key" && r.value != "" {
			r.value = "(set)"
		}
		fmt.Fprintf(stdout, "%-18s %-42s %s\n", r.name, r.value, r.source)
	}
	return err
}

// writeConfigFile sets one key in config.json, keeping the others.
func writeConfigFile(home, key string, value any) error {
	path := filepath.Join(home, "config.json")
	raw, err := readConfigJSON(path)
	if err != nil {
		return err
	}
	raw[key] = value
	b, err := json.MarshalIndent(raw, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(path, append(b, '\n'))
}

// writeFileAtomic replaces path with data so that readers see the old or the
// new file, never a torn one: temp file in the same directory, 0600, fsync,
// rename.
func writeFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(f.Name()) // no-op after a successful rename
	_, err = f.Write(data)
	// Every step runs even after a failure, so the file is always closed; the first error wins.
	if err = cmp.Or(err, f.Chmod(0o600), f.Sync(), f.Close()); err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	// The rename is durable only once the directory is synced; Windows cannot sync one, and
	// there a failure changes nothing.
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// lockFile takes the lock at path: a file created exclusively (O_EXCL, atomic on Linux, macOS
// and Windows alike) that holds the holder's process id. A lock whose holder is gone (its
// process no longer runs, or the lock is older than stale, when stale > 0) is taken over. It
// waits for a live holder until ctx ends; the error then names the holder.
func lockFile(ctx context.Context, path string, stale time.Duration) (unlock func(), err error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	for {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err == nil {
			_, err = fmt.Fprintf(f, "%d\n", os.Getpid())
			if err = cmp.Or(err, f.Close()); err != nil {
				os.Remove(path)
				return nil, err
			}
			return sync.OnceFunc(func() { os.Remove(path) }), nil
		}
		if !errors.Is(err, fs.ErrExist) {
			return nil, err
		}
		holder, gone := lockHolder(path, stale)
		if gone {
			os.Remove(path)
			continue
		}
		if err := sleepCtx(ctx, 50*time.Millisecond); err != nil {
			return nil, fmt.Errorf("%s is held by process %d (%w)", path, holder, err)
		}
	}
}

// lockHolder reads the process id in a lock file and says whether the lock is stale.
func lockHolder(path string, stale time.Duration) (pid int, gone bool) {
	b, err := os.ReadFile(path)
	fi, serr := os.Stat(path)
	if err != nil || serr != nil {
		return 0, false // released meanwhile: try again
	}
	pid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	age := time.Since(fi.ModTime())
	switch {
	case pid <= 0: // being written, or left empty by a crash
		return 0, age > 10*time.Second
	case stale > 0 && age > stale:
		return pid, true
	}
	// On Windows FindProcess fails for a process that is gone; elsewhere it always succeeds,
	// and signal 0 probes: ESRCH means gone.
	p, err := os.FindProcess(pid)
	if err != nil || runtime.GOOS == "windows" {
		return pid, err != nil
	}
	err = p.Signal(syscall.Signal(0))
	return pid, err != nil && !errors.Is(err, os.ErrPermission)
}

// versionString reports the module version that `go install module@version` stamps.
func versionString() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "ccproxy (unknown version)"
	}
	return fmt.Sprintf("%s %s %s", bi.Main.Path, cmp.Or(bi.Main.Version, "(devel)"), bi.GoVersion)
}

// serve runs the proxy until ctx ends or SIGINT/SIGTERM arrives, then drains
// in-flight requests for a bounded time.
func serve(ctx context.Context, cfg config, stdout, stderr io.Writer) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	logger := newLogger(stderr, cfg.logFormat, cfg.logLevel)
	// Two servers on one home would silently drop each other's answered turns.
	now, cancel := context.WithTimeout(ctx, 0)
	unlock, err := lockFile(now, filepath.Join(cfg.home, "serve.lock"), 0)
	cancel()
	if err != nil {
		return fmt.Errorf("another ccproxy serve uses %s: %w; stop it, or give this one another CCPROXY_HOME",
			cfg.home, err)
	}
	defer unlock()
	rollForward(cfg.authPath)
	auth, up := newBackend(cfg.authPath, cfg.authURL, cfg.upstreamURL)
	sessions, err := newSessionStore(filepath.Join(cfg.home, "sessions"), cfg.sessionTTL, cfg.maxSessions,
		cfg.maxSessionBytes, time.Now)
	if err != nil {
		return err
	}
	models := newCatalog(up, filepath.Join(cfg.home, "models.json"), time.Now)
	handler := newServer(logger, cfg, auth, sessions, up, models)
	ln, err := listen(cfg, logger)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "listening on http://%s\n", ln.Addr())
	srv := &http.Server{
		Handler: handler,
		// Slow-header clients would otherwise hold goroutines forever; a stalled body is cut off
		// by bodies.read, and a connection limit keeps what remains from exhausting descriptors.
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		// No WriteTimeout: an SSE response legitimately outlives any fixed
		// deadline (long reasoning), and keepalives show it is alive.
		ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case err := <-served:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	logger.Info("shutting down, draining requests")
	// The run ctx is already done; draining needs a fresh deadline.
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		logger.Warn("drain timed out, closing open streams", "err", err)
		srv.Close()
	}
	return nil
}

// newBackend connects to the Codex backend with the credential file at authPath. The auth
// client may use a whole-request timeout because it never streams.
func newBackend(authPath, authURL, upstreamURL string) (*authStore, *upstream) {
	auth := newAuthStore(authPath, authURL, &http.Client{Timeout: 30 * time.Second}, time.Now)
	return auth, newUpstream(upstreamURL, auth, newUpstreamClient())
}

// listen binds cfg's address, refusing one beyond this machine without an API key. Loopback is
// judged by the address bound, not by the name given: a name may resolve anywhere.
func listen(cfg config, logger *slog.Logger) (net.Listener, error) {
	ln, err := net.Listen("tcp", net.JoinHostPort(cfg.host, strconv.Itoa(cfg.port)))
	if err != nil {
		return nil, fmt.Errorf("listen on port %d: %w (is another server using it? "+
			"choose another with --port)", cfg.port, err)
	}
	if ip := ln.Addr().(*net.TCPAddr).IP; !ip.IsLoopback() {
		if cfg.apiKey == "" {
			ln.Close()
			return nil, usagef("refusing to listen on %s (%s) without an API key: anyone who can reach it "+
				"could use your ChatGPT account; set --api-key (CCPROXY_API_KEY) or use --host 127.0.0.1",
				cfg.host, ip)
		}
		logger.Warn("listening beyond this machine; every request needs the API key", "address", ip)
	}
	return &limitListener{ln, make(chan struct{}, cfg.maxConnections)}, nil
}

// limitListener accepts a connection only while fewer than cap(slots) are open; the others
// wait in the kernel's queue. A flood of connections cannot exhaust the descriptors that the
// backend's connections and the session files need.
type limitListener struct {
	net.Listener
	slots chan struct{}
}

func (l *limitListener) Accept() (net.Conn, error) {
	l.slots <- struct{}{}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.slots
		return nil, err
	}
	return &limitConn{Conn: c, release: sync.OnceFunc(func() { <-l.slots })}, nil
}

type limitConn struct {
	net.Conn
	release func()
}

func (c *limitConn) Close() error {
	c.release()
	return c.Conn.Close()
}

func newLogger(w io.Writer, format string, level slog.Level) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// runUsage implements `ccproxy usage`: the plan and its rate-limit windows, from the backend.
func runUsage(ctx context.Context, args []string, getenv func(string) string,
	stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("ccproxy usage", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); errors.Is(err, flag.ErrHelp) {
		return nil
	} else if err != nil {
		return exitStatus(2) // fs has printed it
	}
	path, err := authFilePath(getenv)
	if err != nil {
		return err
	}
	url := func(env string) string { return strings.TrimRight(getenv(env), "/") }
	_, up := newBackend(path, url("CCPROXY_AUTH_URL"), url("CCPROXY_UPSTREAM_URL"))
	r, err := up.report(ctx)
	if err != nil {
		return fmt.Errorf("read the usage: %w", err)
	}
	if *asJSON {
		_, err := stdout.Write(append(marshal(r), '\n'))
		return err
	}
	fmt.Fprintf(stdout, "plan %s\n", cmp.Or(r.Plan, "unknown"))
	bars := false // on a terminal
	if f, ok := stdout.(*os.File); ok {
		fi, err := f.Stat()
		bars = err == nil && fi.Mode()&os.ModeCharDevice != 0
	}
	for _, w := range []*usageWindow{r.Primary, r.Secondary} {
		if w == nil {
			continue
		}
		name := map[float64]string{300: "5-hour", 10080: "weekly"}[w.WindowMinutes]
		bar := ""
		if bars {
			n := int(min(max(w.UsedPercent, 0), 100) / 5)
			bar = strings.Repeat("█", n) + strings.Repeat("░", 20-n) + " "
		}
		fmt.Fprintf(stdout, "%-7s %s%3.0f%% used, resets in %s\n",
			cmp.Or(name, formatDuration(time.Duration(w.WindowMinutes)*time.Minute)), bar,
			w.UsedPercent, formatDuration(time.Duration(w.ResetsIn)*time.Second))
	}
	return nil
}
