package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// runCmd runs the program with env as its whole environment.
func runCmd(t *testing.T, env map[string]string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	err := run(context.Background(), append([]string{"ccproxy"}, args...), func(k string) string { return env[k] }, strings.NewReader(""), &out, &errb)
	code = exitCode(err, &errb)
	return out.String(), errb.String(), code
}

// testEnv points every directory at fresh temporary ones.
func testEnv(t *testing.T) map[string]string {
	t.Helper()
	d := t.TempDir()
	return map[string]string{"CCPROXY_HOME": filepath.Join(d, "ccproxy"), "CODEX_HOME": filepath.Join(d, "codex"), "HOME": d}
}

func TestRunCommands(t *testing.T) {
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStdout string
		wantStderr string
	}{
		{"no command", nil, 2, "", "Usage: ccproxy COMMAND"},
		{"help", []string{"help"}, 0, "config codex --enable|--disable", ""},
		{"help serve", []string{"help", "serve"}, 0, "CCPROXY_SESSION_TTL", ""},
		{"help unknown", []string{"help", "nope"}, 2, "", "ccproxy help"},
		{"unknown command", []string{"frobnicate"}, 2, "", "unknown command \"frobnicate\"\nrun `ccproxy help` for usage"},
		{"version", []string{"version"}, 0, "go1.", ""},
		{"serve unknown flag", []string{"serve", "--bogus"}, 2, "", "flag provided but not defined: -bogus"},
		{"serve -h", []string{"serve", "-h"}, 0, "", "--max-session-bytes"},
		{"serve bad port", []string{"serve", "--port", "http"}, 2, "", `invalid value "http" for flag -port`},
		{"serve bad port from env", []string{"serve", "CCPROXY_PORT=http"}, 2, "", `invalid --port "http" (from env CCPROXY_PORT)`},
		{"serve bad instructions file", []string{"serve", "CCPROXY_INSTRUCTIONS=file:/nonexistent/prompt.md"}, 2, "", "/nonexistent/prompt.md"},
		{"serve bad reasoning", []string{"serve", "--reasoning", "loud"}, 2, "", "want tags, field or none"},
		{"serve stray argument", []string{"serve", "now"}, 2, "", "serve takes no arguments"},
		{"public bind without key", []string{"serve", "--host", "0.0.0.0", "--port", "0"}, 2, "", "without an API key"},
		{"config without subcommand", []string{"config"}, 2, "", "codex or show"},
		{"config codex both", []string{"config", "codex", "--enable", "--disable"}, 2, "", "exactly one of"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			env, args := testEnv(t), tc.args
			for len(args) > 1 && strings.Contains(args[len(args)-1], "=") { // trailing NAME=value: environment
				k, v, _ := strings.Cut(args[len(args)-1], "=")
				env[k], args = v, args[:len(args)-1]
			}
			stdout, stderr, code := runCmd(t, env, args...)
			if code != tc.wantCode {
				t.Errorf("exit code %d; want %d (stderr %q)", code, tc.wantCode, stderr)
			}
			if !strings.Contains(stdout, tc.wantStdout) {
				t.Errorf("stdout %q; want it to contain %q", stdout, tc.wantStdout)
			}
			if !strings.Contains(stderr, tc.wantStderr) {
				t.Errorf("stderr %q; want it to contain %q", stderr, tc.wantStderr)
			}
		})
	}
}

// TestServeUsageListsEverySetting keeps the hand-written usage honest.
func TestServeUsageListsEverySetting(t *testing.T) {
	for _, s := range settings {
		if !strings.Contains(serveUsage, "--"+s.flag+" ") || !strings.Contains(serveUsage, s.env) {
			t.Errorf("serve usage lacks --%s or %s", s.flag, s.env)
		}
	}
}

func TestPrecedence(t *testing.T) {
	tests := []struct {
		name       string
		flag, env  string
		file       string
		wantValue  string
		wantSource string
	}{
		{"default", "", "", "", "tags", "default"},
		{"file beats default", "", "", "none", "none", "config file"},
		{"env beats file", "", "field", "none", "field", "env CCPROXY_REASONING"},
		{"flag beats env", "none", "field", "tags", "none", "flag --reasoning"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			env := testEnv(t)
			if tc.env != "" {
				env["CCPROXY_REASONING"] = tc.env
			}
			if tc.file != "" {
				if err := writeConfigFile(env["CCPROXY_HOME"], "reasoning", tc.file); err != nil {
					t.Fatal(err)
				}
			}
			file, err := readConfigFile(env["CCPROXY_HOME"])
			if err != nil {
				t.Fatal(err)
			}
			var args []string
			if tc.flag != "" {
				args = []string{"--reasoning", tc.flag}
			}
			cfg, all, err := parseServe(args, func(k string) string { return env[k] }, file, io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			if string(cfg.reasoning) != tc.wantValue {
				t.Errorf("reasoning = %q; want %q", cfg.reasoning, tc.wantValue)
			}
			for _, r := range all {
				if r.name == "reasoning" && r.source != tc.wantSource {
					t.Errorf("source = %q; want %q", r.source, tc.wantSource)
				}
			}
			if tc.flag != "" {
				return // config show takes no flags
			}
			stdout, _, code := runCmd(t, env, "config", "show")
			if code != 0 || !strings.Contains(stdout, tc.wantSource) {
				t.Errorf("config show (exit %d):\n%s\nwant source %q", code, stdout, tc.wantSource)
			}
		})
	}
}

func TestConfigFileErrors(t *testing.T) {
	tests := []struct{ name, content, want string }{
		{"bad json", "{", "not valid JSON"},
		{"unknown key", `{"colour":"red"}`, `unknown key "colour"`},
		{"bad codex flag", `{"codex_enabled":"yes"}`, "true or false"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			env := testEnv(t)
			os.MkdirAll(env["CCPROXY_HOME"], 0o700)
			os.WriteFile(filepath.Join(env["CCPROXY_HOME"], "config.json"), []byte(tc.content), 0o600)
			_, stderr, code := runCmd(t, env, "config", "show")
			if code != 1 || !strings.Contains(stderr, tc.want) || !strings.Contains(stderr, "config.json") {
				t.Errorf("exit %d, stderr %q; want 1 and a message naming config.json with %q", code, stderr, tc.want)
			}
		})
	}
}

func TestConfigCodexDisable(t *testing.T) {
	env := testEnv(t)
	if _, stderr, code := runCmd(t, env, "config", "codex", "--disable"); code != 0 {
		t.Fatalf("config codex --disable: exit %d, %s", code, stderr)
	}
	fi, err := os.Stat(filepath.Join(env["CCPROXY_HOME"], "config.json"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("config.json: %v, mode %v; want 0600", err, fi.Mode())
	}
	addr := startServe(t, env)
	for _, path := range []string{"/codex/v1/models", "/codex/v1/chat/completions"} {
		resp, err := http.Post("http://"+addr+path, "application/json", strings.NewReader(`{}`))
		if path == "/codex/v1/models" {
			resp, err = http.Get("http://" + addr + path)
		}
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 503 || !strings.Contains(string(body), "ccproxy config codex --enable") {
			t.Errorf("%s: %d %s; want 503 naming `ccproxy config codex --enable`", path, resp.StatusCode, body)
		}
	}
	resp, err := http.Get("http://" + addr + "/health")
	if err != nil || resp.StatusCode != 200 {
		t.Errorf("/health while /codex is disabled: %v %v; want 200", resp, err)
	}
}

// startServe runs `ccproxy serve --port 0` until the test ends and returns
// the announced address once /health answers.
func startServe(t *testing.T, env map[string]string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, append([]string{"ccproxy", "serve", "--port", "0"}, args...), func(k string) string { return env[k] }, nil, pw, io.Discard)
		pw.Close()
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("run returned %v after cancel; want nil", err)
			}
		case <-time.After(15 * time.Second):
			t.Error("run did not return after cancel")
		}
	})
	line, err := bufio.NewReader(pr).ReadString('\n')
	if err != nil {
		t.Fatalf("reading the listening line: %v (run: %v)", err, <-done)
	}
	go io.Copy(io.Discard, pr)
	addr, ok := strings.CutPrefix(strings.TrimSpace(line), "listening on http://")
	if !ok {
		t.Fatalf("first line %q; want listening on http://HOST:PORT", line)
	}
	// The socket is bound before the line is printed, so this cannot race.
	req, _ := http.NewRequest("GET", "http://"+addr+"/health", nil)
	req.Header.Set("Authorization", "Bearer "+env["CCPROXY_API_KEY"])
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("/health: %v", err)
	}
	resp.Body.Close()
	return addr
}

func TestServeLifecycle(t *testing.T) {
	env := testEnv(t)
	addr := startServe(t, env)
	resp, err := http.Get("http://" + addr + "/health")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != `{"logged_in":false,"status":"ok"}` {
		t.Errorf("/health = %s; want ok and not logged in", body)
	}
	if resp.Header.Get("X-Request-Id") == "" {
		t.Error("no X-Request-Id header")
	}
}

func TestServeBusyPort(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	_, stderr, code := runCmd(t, testEnv(t), "serve", "--port", port)
	if code != 1 || !strings.Contains(stderr, "listen on port "+port) || !strings.Contains(stderr, "--port") {
		t.Errorf("exit %d, stderr %q; want 1 and a message naming port %s", code, stderr, port)
	}
}

func TestServeAPIKey(t *testing.T) {
	env := testEnv(t)
	env["CCPROXY_API_KEY"] = "sekrit"
	addr := startServe(t, env, "--host", "127.0.0.1")
	tests := []struct {
		name   string
		header map[string]string
		want   int
	}{
		{"no key", nil, 401},
		{"wrong key", map[string]string{"Authorization": "Bearer nope"}, 401},
		{"bearer", map[string]string{"Authorization": "Bearer sekrit"}, 200},
		{"x-api-key", map[string]string{"X-Api-Key": "sekrit"}, 200},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest("GET", "http://"+addr+"/health", nil)
			for k, v := range tc.header {
				req.Header.Set(k, v)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.want {
				t.Errorf("status %d (%s); want %d", resp.StatusCode, body, tc.want)
			}
			if tc.want == 401 && !strings.Contains(string(body), `"type":"authentication_error"`) {
				t.Errorf("body %s; want an OpenAI authentication_error", body)
			}
		})
	}
}

// TestDeps fails when the build or the tests import anything beyond the
// standard library and golang.org/x/oauth2.
func TestDeps(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go list")
	}
	out, err := exec.Command("go", "list", "-deps", "-test", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, dep := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if !strings.HasPrefix(dep, "github.com/ccproxy-go/ccproxy") && !strings.HasPrefix(dep, "golang.org/x/oauth2") {
			t.Errorf("dependency %s is not allowed: only the standard library and golang.org/x/oauth2", dep)
		}
	}
}

// TestServeOwnsItsHome: a second serve on the same CCPROXY_HOME refuses to start and names
// the process that holds it; a lock left by a process that is gone is taken over.
func TestServeOwnsItsHome(t *testing.T) {
	env := testEnv(t)
	startServe(t, env)
	_, stderr, code := runCmd(t, env, "serve", "--port", "0")
	if code != 1 || !strings.Contains(stderr, "another ccproxy serve uses") || !strings.Contains(stderr, fmt.Sprintf("process %d", os.Getpid())) {
		t.Errorf("second serve: exit %d, %q; want 1 naming the holder", code, stderr)
	}
	stale := testEnv(t)
	os.MkdirAll(stale["CCPROXY_HOME"], 0o700)
	// A process id that no process has (Linux caps them at 2^22).
	os.WriteFile(filepath.Join(stale["CCPROXY_HOME"], "serve.lock"), []byte("99999999\n"), 0o600)
	startServe(t, stale)
}

// TestBindChecksTheAddress: without an API key serve refuses any address that is not loopback,
// whatever name gave it.
func TestBindChecksTheAddress(t *testing.T) {
	hosts := []string{"0.0.0.0", "::"}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if ip, ok := a.(*net.IPNet); ok && !ip.IP.IsLoopback() && ip.IP.To4() != nil {
				hosts = append(hosts, ip.IP.String())
			}
		}
	}
	for _, host := range hosts {
		_, stderr, code := runCmd(t, testEnv(t), "serve", "--host", host, "--port", "0")
		if code != 2 || !strings.Contains(stderr, "without an API key") {
			t.Errorf("--host %s: exit %d, %q; want 2 and a refusal", host, code, stderr)
		}
	}
	env := testEnv(t)
	env["CCPROXY_HOST"] = "LOCALHOST"
	startServe(t, env) // a name that resolves to loopback is fine
}

// TestRollForward: a refresh cut short between the token server's answer and the rename left a
// complete, newer temp file: serve puts it in place; a stale or torn one is removed.
func TestRollForward(t *testing.T) {
	env := testEnv(t)
	dir := env["CODEX_HOME"]
	os.MkdirAll(dir, 0o700)
	auth := func(refresh, when string) string {
		return fmt.Sprintf(`{"OPENAI_API_KEY":null,"tokens":{"access_token":"","refresh_token":%q},"last_refresh":%q}`, refresh, when)
	}
	os.WriteFile(filepath.Join(dir, "auth.json"), []byte(auth("rt-spent", "2026-12-01T00:00:00Z")), 0o600)
	os.WriteFile(filepath.Join(dir, ".auth.json.tmp111"), []byte(auth("rt-new", "2026-12-04T00:00:00Z")), 0o600)
	os.WriteFile(filepath.Join(dir, ".auth.json.tmp222"), []byte(auth("rt-older", "2026-11-01T00:00:00Z")), 0o600)
	os.WriteFile(filepath.Join(dir, ".auth.json.tmp333"), []byte(`{"tokens":{"refresh_tok`), 0o600)
	startServe(t, env)
	b, _ := os.ReadFile(filepath.Join(dir, "auth.json"))
	left, _ := filepath.Glob(filepath.Join(dir, ".auth.json.tmp*"))
	if !strings.Contains(string(b), "rt-new") || len(left) != 0 {
		t.Errorf("auth.json %s and temp files %v; want rt-new and no temp files", b, left)
	}
}

// TestLimitListener: with every slot taken, a connection waits in the queue until one closes.
func TestLimitListener(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := &limitListener{inner, make(chan struct{}, 1)}
	defer l.Close()
	for range 2 {
		c, err := net.Dial("tcp", inner.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	first, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	second := make(chan net.Conn)
	go func() {
		c, _ := l.Accept()
		second <- c
	}()
	if len(l.slots) != cap(l.slots) {
		t.Fatalf("%d of %d slots taken; want all", len(l.slots), cap(l.slots))
	}
	first.Close()
	first.Close() // closing twice gives the slot back once
	if c := <-second; c == nil {
		t.Fatal("the queued connection was not accepted after a slot freed")
	} else {
		c.Close()
	}
	if len(l.slots) != 0 {
		t.Errorf("%d slots taken after both closed; want 0", len(l.slots))
	}
}
