package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/oauth2"
)

// testNow is the clock of authStore tests.
var testNow = time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)

// fakeJWT returns an unsigned JWT carrying claims, as the issuer's tokens do.
func fakeJWT(t testing.TB, claims map[string]any) string {
	t.Helper()
	payload, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	enc := base64.RawURLEncoding.EncodeToString
	return enc([]byte(`{"alg":"RS256","typ":"JWT"}`)) + "." + enc(payload) + "." + enc([]byte("signature"))
}

// chatgptJWT returns a token with the ChatGPT claims ("https://api.openai.com/auth").
func chatgptJWT(t testing.TB, jti string, exp time.Time) string {
	t.Helper()
	return fakeJWT(t, map[string]any{
		"jti": jti,
		"exp": exp.Unix(),
		"https://api.openai.com/auth": map[string]any{
			"chatgpt_account_id": "acc-1",
			"chatgpt_plan_type":  "plus",
		},
		"https://api.openai.com/profile": map[string]any{"email": "user@example.com"},
	})
}

// writeFile replaces path with data, mode 0600, atomically as the Codex CLI
// does, so that a concurrent reader never sees half a file.
func writeFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path+".tmp", []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		t.Fatal(err)
	}
}

// codexAuthJSON is auth.json exactly as the Codex CLI writes it.
func codexAuthJSON(access, refresh, id string) string {
	return fmt.Sprintf(`{
  "auth_mode": "chatgpt",
  "OPENAI_API_KEY": null,
  "tokens": {
    "id_token": %q,
    "access_token": %q,
    "refresh_token": %q,
    "account_id": "acc-1"
  },
  "last_refresh": "2025-12-28T20:40:58.139605Z"
}
`, id, access, refresh)
}

// readJSON decodes the file at path into a generic map.
func readJSON(t *testing.T, path string) map[string]any {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatalf("%s is not JSON: %v", path, err)
	}
	return m
}

// s256 is the PKCE S256 challenge of verifier (RFC 7636 §4.2).
func s256(verifier string) string {
	sum := sha256.Sum256([]byte(verifier))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

// fakeOAuth is the issuer: authorize, token (code and refresh grants) and the
// device-code endpoints. It checks the wire format and PKCE, and rotates
// refresh tokens single-use like the real server.
type fakeOAuth struct {
	*httptest.Server
	t   *testing.T
	exp time.Time // expiry of the access tokens it issues
	// When refreshArrived is set, a refresh request signals it and waits for
	// refreshGate to close before being answered.
	refreshArrived, refreshGate chan struct{}

	mu           sync.Mutex
	codes        map[string]issuedCode // authorization codes not yet redeemed
	refreshToken string                // the one refresh token that is still valid
	refreshes    int                   // successful refresh grants
	pendingPolls int                   // device polls answered 403 before success
	devicePolls  int
	issued       int
}

// issuedCode is what the fake remembers about an authorization code.
type issuedCode struct{ challenge, redirectURI string }

// newFakeOAuth starts a fake issuer whose access tokens expire at exp.
func newFakeOAuth(t *testing.T, exp time.Time) *fakeOAuth {
	t.Helper()
	f := &fakeOAuth{t: t, exp: exp, codes: map[string]issuedCode{}, refreshToken: "rt-1"}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /oauth/authorize", f.authorize)
	mux.HandleFunc("POST /oauth/token", f.token)
	mux.HandleFunc("POST /api/accounts/deviceauth/usercode", f.userCode)
	mux.HandleFunc("POST /api/accounts/deviceauth/token", f.deviceToken)
	f.Server = httptest.NewServer(mux)
	t.Cleanup(f.Close)
	return f
}

// counts returns the number of refresh grants served.
func (f *fakeOAuth) refreshCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.refreshes
}

// authorize checks the Codex CLI's authorize query and redirects with a code.
func (f *fakeOAuth) authorize(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	for k, want := range map[string]string{
		"response_type":              "code",
		"client_id":                  "app_EMoamEEZ73f0CkXaXp7hrann",
		"scope":                      "openid profile email offline_access",
		"code_challenge_method":      "S256",
		"id_token_add_organizations": "true",
		"codex_cli_simplified_flow":  "true",
		"originator":                 "codex_cli_rs",
	} {
		if got := q.Get(k); got != want {
			f.t.Errorf("authorize %s = %q; want %q", k, got, want)
		}
	}
	redirect := q.Get("redirect_uri")
	if !regexp.MustCompile(`^http://localhost:\d+/auth/callback$`).MatchString(redirect) {
		f.t.Errorf("authorize redirect_uri = %q; want http://localhost:PORT/auth/callback", redirect)
	}
	if len(q.Get("state")) < 43 || q.Get("code_challenge") == "" {
		f.t.Errorf("authorize state %q, code_challenge %q; want 32 random bytes and a challenge", q.Get("state"), q.Get("code_challenge"))
	}
	f.mu.Lock()
	code := fmt.Sprintf("code-%d", len(f.codes)+1)
	f.codes[code] = issuedCode{q.Get("code_challenge"), redirect}
	f.mu.Unlock()
	http.Redirect(w, r, redirect+"?"+url.Values{"code": {code}, "state": {q.Get("state")}}.Encode(), http.StatusFound)
}

// tokens answers a successful grant with a fresh token set.
func (f *fakeOAuth) tokens(w http.ResponseWriter) {
	f.issued++
	f.refreshToken = fmt.Sprintf("rt-%d", f.issued+1)
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{
		"access_token":  chatgptJWT(f.t, fmt.Sprintf("access-%d", f.issued), f.exp),
		"id_token":      chatgptJWT(f.t, fmt.Sprintf("id-%d", f.issued), f.exp),
		"refresh_token": f.refreshToken,
		"expires_in":    864000,
	})
}

// token serves the authorization-code grant (form body) and the refresh grant
// (JSON body), as auth.openai.com does.
func (f *fakeOAuth) token(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Content-Type") == "application/json" && f.refreshArrived != nil {
		f.refreshArrived <- struct{}{}
		<-f.refreshGate
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if r.Header.Get("Content-Type") == "application/json" {
		var req map[string]string
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			f.t.Errorf("refresh body: %v", err)
		}
		if req["client_id"] != "app_EMoamEEZ73f0CkXaXp7hrann" || req["grant_type"] != "refresh_token" {
			f.t.Errorf("refresh body = %v; want client_id and grant_type=refresh_token", req)
		}
		if req["refresh_token"] != f.refreshToken {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, `{"error":{"message":"Your refresh token has already been used to generate a new access token. Please try signing in again.","type":"invalid_request_error","param":null,"code":"refresh_token_reused"}}`)
			return
		}
		f.refreshes++
		f.tokens(w)
		return
	}
	if err := r.ParseForm(); err != nil {
		f.t.Errorf("token form: %v", err)
	}
	issued, ok := f.codes[r.PostForm.Get("code")]
	delete(f.codes, r.PostForm.Get("code"))
	switch {
	case r.PostForm.Get("grant_type") != "authorization_code" || r.PostForm.Get("client_id") != "app_EMoamEEZ73f0CkXaXp7hrann":
		f.t.Errorf("token form = %v; want grant_type=authorization_code and the client id", r.PostForm)
	case !ok:
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		io.WriteString(w, `{"error":"invalid_grant","error_description":"unknown or used authorization code"}`)
	case r.PostForm.Get("redirect_uri") != issued.redirectURI:
		f.t.Errorf("token redirect_uri = %q; want %q", r.PostForm.Get("redirect_uri"), issued.redirectURI)
	case s256(r.PostForm.Get("code_verifier")) != issued.challenge:
		f.t.Errorf("PKCE: sha256(code_verifier) does not match the code_challenge of the authorize request")
		w.WriteHeader(http.StatusBadRequest)
	default:
		f.tokens(w)
	}
}

// userCode starts a device-code login.
func (f *fakeOAuth) userCode(w http.ResponseWriter, r *http.Request) {
	var req map[string]string
	json.NewDecoder(r.Body).Decode(&req)
	if req["client_id"] != "app_EMoamEEZ73f0CkXaXp7hrann" {
		f.t.Errorf("usercode body = %v; want the client id", req)
	}
	io.WriteString(w, `{"device_auth_id":"dev-1","user_code":"ABCD-1234","interval":"5"}`)
}

// deviceToken is pending for pendingPolls polls, then hands over a code.
func (f *fakeOAuth) deviceToken(w http.ResponseWriter, r *http.Request) {
	var req map[string]string
	json.NewDecoder(r.Body).Decode(&req)
	if req["device_auth_id"] != "dev-1" || req["user_code"] != "ABCD-1234" {
		f.t.Errorf("device token body = %v; want the device_auth_id and user_code handed out", req)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.devicePolls++
	if f.devicePolls <= f.pendingPolls {
		w.WriteHeader(http.StatusForbidden)
		io.WriteString(w, `{"error":{"message":"Device authorization is pending","code":"deviceauth_pending"}}`)
		return
	}
	verifier := oauth2.GenerateVerifier()
	f.codes["dev-code"] = issuedCode{s256(verifier), f.URL + "/deviceauth/callback"}
	json.NewEncoder(w).Encode(map[string]string{
		"authorization_code": "dev-code", "code_challenge": s256(verifier), "code_verifier": verifier,
	})
}

// output is a goroutine-safe writer a test can wait on.
type output struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	changed chan struct{}
}

func newOutput() *output { return &output{changed: make(chan struct{}, 1)} }

func (o *output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	select {
	case o.changed <- struct{}{}:
	default:
	}
	return o.buf.Write(p)
}

func (o *output) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.String()
}

// waitFor returns the first match of re once it has been written.
func (o *output) waitFor(t *testing.T, re string) string {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		if m := regexp.MustCompile(re).FindString(o.String()); m != "" {
			return m
		}
		select {
		case <-o.changed:
		case <-timeout:
			t.Fatalf("output %q never matched %s", o.String(), re)
		}
	}
}

// startLogin runs `auth login-openai --no-browser --callback-port 0` against
// fake in the background and returns its outputs and result.
func startLogin(t *testing.T, fake *fakeOAuth, dir string, stdin io.Reader) (stdout, stderr *output, done chan error) {
	t.Helper()
	return startLoginOn(t, fake, dir, stdin, "0")
}

// startLoginOn is startLogin with the callback on port.
func startLoginOn(t *testing.T, fake *fakeOAuth, dir string, stdin io.Reader, port string) (stdout, stderr *output, done chan error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	env := map[string]string{"CODEX_HOME": dir, "CCPROXY_AUTH_URL": fake.URL}
	stdout, stderr, done = newOutput(), newOutput(), make(chan error, 1)
	go func() {
		done <- runAuth(ctx, []string{"login-openai", "--no-browser", "--callback-port", port},
			func(k string) string { return env[k] }, stdin, stdout, stderr)
	}()
	return stdout, stderr, done
}

// result waits for a background command.
func result(t *testing.T, done chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("command did not finish")
		return nil
	}
}

// blockedStdin is a stdin nobody types into.
func blockedStdin(t *testing.T) io.Reader {
	t.Helper()
	r, w := io.Pipe()
	t.Cleanup(func() { w.Close() })
	return r
}

// checkSavedLogin checks a freshly written auth.json: Codex CLI layout, mode 0600.
func checkSavedLogin(t *testing.T, path string) map[string]any {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode of %s = %v; want 0600", path, fi.Mode().Perm())
	}
	m := readJSON(t, path)
	if v, ok := m["OPENAI_API_KEY"]; !ok || v != nil {
		t.Errorf("OPENAI_API_KEY = %v (present %v); want null", v, ok)
	}
	if m["auth_mode"] != "chatgpt" {
		t.Errorf("auth_mode = %v; want chatgpt", m["auth_mode"])
	}
	tokens, _ := m["tokens"].(map[string]any)
	for _, k := range []string{"id_token", "access_token", "refresh_token"} {
		if s, _ := tokens[k].(string); s == "" {
			t.Errorf("tokens.%s missing in %v", k, tokens)
		}
	}
	if tokens["account_id"] != "acc-1" {
		t.Errorf("tokens.account_id = %v; want acc-1", tokens["account_id"])
	}
	if s, _ := m["last_refresh"].(string); !strings.HasSuffix(s, "Z") {
		t.Errorf("last_refresh = %q; want RFC 3339 UTC", s)
	} else if _, err := time.Parse(time.RFC3339Nano, s); err != nil {
		t.Errorf("last_refresh: %v", err)
	}
	return m
}

func TestLoginCallback(t *testing.T) {
	fake := newFakeOAuth(t, time.Now().Add(240*time.Hour))
	dir := t.TempDir()
	path := filepath.Join(dir, "auth.json")
	// An API-key file with a field of its own: the login must switch it to
	// ChatGPT mode and keep the field.
	writeFile(t, path, `{"OPENAI_API_KEY":"sk-old","custom":{"keep":true}}`)
	stdout, stderr, done := startLogin(t, fake, dir, blockedStdin(t))

	authURL := stderr.waitFor(t, regexp.QuoteMeta(fake.URL)+`/oauth/authorize\?\S+`)
	browser := &http.Client{}
	resp, err := browser.Get(authURL) // authorize, then follow the redirect to the callback
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(page), "You can close this tab") {
		t.Errorf("callback = %d %q; want 200 and the success page", resp.StatusCode, page)
	}
	if err := result(t, done); err != nil {
		t.Fatalf("login: %v", err)
	}
	want := fmt.Sprintf("logged in as user@example.com (plan PLUS), credentials saved to %s\n", path)
	if got := stdout.String(); got != want {
		t.Errorf("stdout = %q; want %q", got, want)
	}
	m := checkSavedLogin(t, path)
	if got, _ := json.Marshal(m["custom"]); string(got) != `{"keep":true}` {
		t.Errorf("custom = %s; want the field kept", got)
	}
}

func TestLoginCallbackRefused(t *testing.T) {
	tests := []struct {
		name     string
		query    func(state string) url.Values
		status   int
		page     string
		loginErr string // "" when the login keeps waiting
	}{
		{"state mismatch", func(string) url.Values { return url.Values{"code": {"code-1"}, "state": {"forged"}} },
			http.StatusBadRequest, "State mismatch", ""},
		{"no entitlement", func(s string) url.Values {
			return url.Values{"state": {s}, "error": {"access_denied"}, "error_description": {"missing_codex_entitlement"}}
		}, http.StatusBadRequest, "Codex is not enabled for your workspace", "Codex is not enabled for your workspace"},
		{"missing code", func(s string) url.Values { return url.Values{"state": {s}} },
			http.StatusBadRequest, "no authorization code", "no authorization code"},
		{"code refused by the token endpoint", func(s string) url.Values { return url.Values{"state": {s}, "code": {"bogus"}} },
			http.StatusBadRequest, "unknown or used authorization code", "invalid_grant: unknown or used authorization code"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fake := newFakeOAuth(t, time.Now().Add(time.Hour))
			dir := t.TempDir()
			_, stderr, done := startLogin(t, fake, dir, blockedStdin(t))
			authURL, err := url.Parse(stderr.waitFor(t, regexp.QuoteMeta(fake.URL)+`/oauth/authorize\?\S+`))
			if err != nil {
				t.Fatal(err)
			}
			callback := authURL.Query().Get("redirect_uri")
			browser := &http.Client{}
			resp, err := browser.Get(callback + "?" + tc.query(authURL.Query().Get("state")).Encode())
			if err != nil {
				t.Fatal(err)
			}
			page, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.status || !strings.Contains(string(page), tc.page) {
				t.Errorf("callback = %d %q; want %d and %q", resp.StatusCode, page, tc.status, tc.page)
			}
			if tc.loginErr == "" { // still waiting: end it the way a second login would
				resp, err := browser.Get(strings.Replace(callback, "/auth/callback", "/cancel", 1))
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				tc.loginErr = "cancelled"
			}
			if err := result(t, done); err == nil || !strings.Contains(err.Error(), tc.loginErr) {
				t.Errorf("login error = %v; want it to mention %q", err, tc.loginErr)
			}
			if _, err := os.Stat(filepath.Join(dir, "auth.json")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("auth.json exists after a refused login (stat: %v)", err)
			}
		})
	}
}

func TestLoginCancelsStaleLogin(t *testing.T) {
	fake := newFakeOAuth(t, time.Now().Add(time.Hour))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()
	_, firstErr, first := startLoginOn(t, fake, t.TempDir(), blockedStdin(t), port)
	firstErr.waitFor(t, "/oauth/authorize")

	// A second login on the same port asks the first to stop, then binds.
	_, secondErr, _ := startLoginOn(t, fake, t.TempDir(), blockedStdin(t), port)
	if err := result(t, first); err == nil || !strings.Contains(err.Error(), "cancelled") {
		t.Errorf("first login error = %v; want it cancelled", err)
	}
	if got := secondErr.waitFor(t, `redirect_uri=[^&\s]+`); !strings.Contains(got, "%3A"+port+"%2F") {
		t.Errorf("second login %s; want port %s", got, port)
	}
}

func TestLoginPaste(t *testing.T) {
	fake := newFakeOAuth(t, time.Now().Add(time.Hour))
	dir := t.TempDir()
	stdin, typing := io.Pipe()
	t.Cleanup(func() { typing.Close() })
	_, stderr, done := startLogin(t, fake, dir, stdin)

	authURL := stderr.waitFor(t, regexp.QuoteMeta(fake.URL)+`/oauth/authorize\?\S+`)
	// The browser cannot reach the callback (SSH): it stops at the redirect.
	browser := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := browser.Get(authURL)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	redirect := resp.Header.Get("Location")
	forged := regexp.MustCompile(`state=[^&]+`).ReplaceAllString(redirect, "state=forged")
	for _, line := range []string{"not a url", forged, redirect} {
		if _, err := io.WriteString(typing, line+"\n"); err != nil {
			t.Fatal(err)
		}
	}
	if err := result(t, done); err != nil {
		t.Fatalf("login: %v", err)
	}
	for _, want := range []string{"not the redirect URL", "state mismatch"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("stderr = %q; want it to mention %q", stderr.String(), want)
		}
	}
	checkSavedLogin(t, filepath.Join(dir, "auth.json"))
}

func TestLoginDevice(t *testing.T) {
	fake := newFakeOAuth(t, time.Now().Add(time.Hour))
	fake.pendingPolls = 2
	path := filepath.Join(t.TempDir(), "auth.json")
	var waits []time.Duration
	stderr := newOutput()
	l := &login{issuer: fake.URL, path: path, client: fake.Client(), now: time.Now, stderr: stderr,
		wait: func(ctx context.Context, d time.Duration) error { waits = append(waits, d); return ctx.Err() }}
	if err := l.device(context.Background()); err != nil {
		t.Fatalf("device login: %v", err)
	}
	if f, err := readAuthFile(path); err != nil {
		t.Errorf("read the saved login: %v", err)
	} else if f.email != "user@example.com" {
		t.Errorf("email = %q; want user@example.com", f.email)
	}
	fake.mu.Lock()
	polls := fake.devicePolls
	fake.mu.Unlock()
	if polls != 3 {
		t.Errorf("polls = %d; want 2 pending and 1 successful", polls)
	}
	if want := []time.Duration{5 * time.Second, 5 * time.Second, 5 * time.Second}; fmt.Sprint(waits) != fmt.Sprint(want) {
		t.Errorf("waits = %v; want %v", waits, want)
	}
	for _, want := range []string{"ABCD-1234", fake.URL + "/codex/device", "security settings"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("stderr = %q; want it to mention %q", stderr.String(), want)
		}
	}
	checkSavedLogin(t, path)
}

// newTestStore returns a store on path using fake and the test clock.
func newTestAuthStore(fake *fakeOAuth, path string) *authStore {
	return newAuthStore(path, fake.URL, fake.Client(), func() time.Time { return testNow })
}

func TestTokenRefreshConcurrent(t *testing.T) {
	fake := newFakeOAuth(t, testNow.Add(240*time.Hour))
	path := filepath.Join(t.TempDir(), "auth.json")
	expired := chatgptJWT(t, "old", testNow.Add(-time.Minute))
	writeFile(t, path, codexAuthJSON(expired, "rt-1", chatgptJWT(t, "id", testNow)))
	a := newTestAuthStore(fake, path)

	const callers = 50
	got := make([]secret, callers)
	var wg sync.WaitGroup
	for i := range callers {
		wg.Go(func() {
			tok, account, err := a.token(context.Background(), "")
			if err != nil || account != "acc-1" {
				t.Errorf("token() = _, %q, %v; want acc-1 and no error", account, err)
			}
			got[i] = tok
		})
	}
	wg.Wait()
	if n := fake.refreshCount(); n != 1 {
		t.Errorf("refresh requests = %d; want 1", n)
	}
	for i, tok := range got {
		if tok != got[0] || string(tok) == expired {
			t.Fatalf("caller %d got a different or expired token", i)
		}
	}
	tokens := readJSON(t, path)["tokens"].(map[string]any)
	if tokens["refresh_token"] != "rt-2" || tokens["access_token"] != string(got[0]) {
		t.Errorf("file tokens = %v; want the rotated refresh token rt-2 and the new access token", tokens)
	}
}

func TestTokenRefreshOutlivesCaller(t *testing.T) {
	fake := newFakeOAuth(t, testNow.Add(time.Hour))
	fake.refreshArrived, fake.refreshGate = make(chan struct{}), make(chan struct{})
	path := filepath.Join(t.TempDir(), "auth.json")
	writeFile(t, path, codexAuthJSON(chatgptJWT(t, "old", testNow.Add(-time.Hour)), "rt-1", ""))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, _, err := newTestAuthStore(fake, path).token(ctx, "")
		done <- err
	}()
	<-fake.refreshArrived
	cancel() // the client disconnects while the refresh token is being spent
	close(fake.refreshGate)
	result(t, done)
	if got := readJSON(t, path)["tokens"].(map[string]any)["refresh_token"]; got != "rt-2" {
		t.Errorf("refresh_token on disk = %v; want the rotated rt-2 saved despite the cancelled caller", got)
	}
}

func TestTokenRefreshReused(t *testing.T) {
	fake := newFakeOAuth(t, testNow.Add(time.Hour))
	fake.refreshToken = "rt-spent-by-codex"
	path := filepath.Join(t.TempDir(), "auth.json")
	writeFile(t, path, codexAuthJSON(chatgptJWT(t, "old", testNow.Add(-time.Hour)), "rt-1", chatgptJWT(t, "id", testNow)))
	before, _ := os.ReadFile(path)

	_, _, err := newTestAuthStore(fake, path).token(context.Background(), "")
	if !errors.Is(err, errLoginRequired) {
		t.Fatalf("token() error = %v; want errLoginRequired", err)
	}
	for _, want := range []string{"refresh_token_reused", "already been used", "run `ccproxy auth login-openai`"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(after, before) {
		t.Errorf("auth.json changed after a failed refresh:\n%s", after)
	}
}

func TestTokenAdoptsOtherProcessRefresh(t *testing.T) {
	tests := []struct {
		name string
		// run rewrites the file as another process would, around a.token
		run func(t *testing.T, a *authStore, path, old, fresh string) (secret, error)
	}{
		{"file changed since last read", func(t *testing.T, a *authStore, path, old, fresh string) (secret, error) {
			if tok, _, err := a.token(context.Background(), ""); err != nil || string(tok) != old {
				t.Fatalf("first token() = %v; want the old token", err)
			}
			writeFile(t, path, codexAuthJSON(fresh, "rt-other", "")+"\n") // a different size, as a rewrite would be
			tok, _, err := a.token(context.Background(), "")
			return tok, err
		}},
		{"rejected token already replaced", func(t *testing.T, a *authStore, path, old, fresh string) (secret, error) {
			writeFile(t, path, codexAuthJSON(fresh, "rt-other", ""))
			tok, _, err := a.token(context.Background(), old)
			return tok, err
		}},
		{"refreshed while we waited for the lock", func(t *testing.T, a *authStore, path, old, fresh string) (secret, error) {
			// Whether token() reads the file before or after the write, it
			// must end with the token on disk and no refresh of its own.
			release := holdLock(t, path)                                      // another ccproxy is refreshing
			a.now = func() time.Time { return testNow.Add(90 * time.Minute) } // old has expired, fresh has not
			done := make(chan error, 1)
			var tok secret
			go func() {
				var err error
				tok, _, err = a.token(context.Background(), "")
				done <- err
			}()
			writeFile(t, path, codexAuthJSON(fresh, "rt-other", ""))
			release()
			err := result(t, done)
			return tok, err
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fake := newFakeOAuth(t, testNow.Add(time.Hour))
			path := filepath.Join(t.TempDir(), "auth.json")
			old, fresh := chatgptJWT(t, "old", testNow.Add(time.Hour)), chatgptJWT(t, "fresh", testNow.Add(2*time.Hour))
			writeFile(t, path, codexAuthJSON(old, "rt-1", ""))
			tok, err := tc.run(t, newTestAuthStore(fake, path), path, old, fresh)
			if err != nil || string(tok) != fresh {
				t.Errorf("token() = %v; want the token the other process wrote", err)
			}
			if n := fake.refreshCount(); n != 0 {
				t.Errorf("refresh requests = %d; want 0", n)
			}
		})
	}
}

// holdLock takes ccproxy's lock on the credential file, as another ccproxy process would, and
// returns its release.
func holdLock(t *testing.T, path string) (release func()) {
	t.Helper()
	unlock, err := lockFile(context.Background(), filepath.Join(filepath.Dir(path), lockFileName), 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(unlock)
	return unlock
}

func TestTokenLockWaitHonoursContext(t *testing.T) {
	fake := newFakeOAuth(t, testNow.Add(time.Hour))
	path := filepath.Join(t.TempDir(), "auth.json")
	writeFile(t, path, codexAuthJSON(chatgptJWT(t, "old", testNow.Add(-time.Hour)), "rt-1", ""))
	holdLock(t, path)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, _, err := newTestAuthStore(fake, path).token(ctx, "")
		done <- err
	}()
	cancel()
	if err := result(t, done); !errors.Is(err, context.Canceled) {
		t.Errorf("token() error = %v; want context.Canceled", err)
	}
	if n := fake.refreshCount(); n != 0 {
		t.Errorf("refresh requests = %d; want 0", n)
	}
}

func TestTokenRejectedRefreshesOnce(t *testing.T) {
	fake := newFakeOAuth(t, testNow.Add(time.Hour))
	path := filepath.Join(t.TempDir(), "auth.json")
	old := chatgptJWT(t, "old", testNow.Add(time.Hour))
	writeFile(t, path, codexAuthJSON(old, "rt-1", ""))
	a := newTestAuthStore(fake, path)
	first, _, err := a.token(context.Background(), old)
	if err != nil || string(first) == old {
		t.Fatalf("token(rejected) = %v; want a new token", err)
	}
	for _, rejected := range []string{old, ""} {
		tok, _, err := a.token(context.Background(), rejected)
		if err != nil || tok != first {
			t.Errorf("token(%.8q) = %v; want the token of the first refresh", rejected, err)
		}
	}
	if n := fake.refreshCount(); n != 1 {
		t.Errorf("refresh requests = %d; want 1", n)
	}
}

func TestTokenRefreshPreservesFile(t *testing.T) {
	fixture, err := os.ReadFile("testdata/auth/codex-cli.json")
	if err != nil {
		t.Fatal(err)
	}
	fake := newFakeOAuth(t, testNow.Add(time.Hour))
	fake.refreshToken = "rt_fixture-refresh-token"
	path := filepath.Join(t.TempDir(), "auth.json")
	writeFile(t, path, string(fixture))
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	a := newTestAuthStore(fake, path)
	old, account, err := a.token(context.Background(), "")
	if err != nil || account != "532cfd8b-7b79-49b5-a51e-858c96e5b053" {
		t.Fatalf("token() = _, %q, %v; want the fixture's account", account, err)
	}
	if _, _, err := a.token(context.Background(), string(old)); err != nil {
		t.Fatalf("token(rejected): %v", err)
	}

	var before, after map[string]any
	json.Unmarshal(fixture, &before)
	after = readJSON(t, path)
	bt, at := before["tokens"].(map[string]any), after["tokens"].(map[string]any)
	for _, k := range []string{"id_token", "access_token", "refresh_token"} {
		if at[k] == bt[k] {
			t.Errorf("tokens.%s not replaced", k)
		}
		delete(at, k)
		delete(bt, k)
	}
	if after["last_refresh"] != testNow.Format(time.RFC3339Nano) {
		t.Errorf("last_refresh = %v; want %v", after["last_refresh"], testNow.Format(time.RFC3339Nano))
	}
	delete(after, "last_refresh")
	delete(before, "last_refresh")
	if b, a := fmt.Sprint(before), fmt.Sprint(after); b != a {
		t.Errorf("other fields changed:\nbefore %s\nafter  %s", b, a)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("mode = %v; want 0600", fi.Mode().Perm())
	}
}

func TestReadLayouts(t *testing.T) {
	access := chatgptJWT(t, "a", testNow.Add(time.Hour))
	idOther := fakeJWT(t, map[string]any{"https://api.openai.com/auth": map[string]any{"chatgpt_account_id": "acc-from-id"}})
	tests := []struct {
		name, file, wantAccount string
	}{
		{"codex cli", codexAuthJSON(access, "rt", ""), "acc-1"},
		{"flat", fmt.Sprintf(`{"access_token":%q,"refresh_token":"rt","id_token":%q,"expires_at":1767225600,"account_id":"acc-flat"}`, access, idOther), "acc-flat"},
		{"flat, account from id_token", fmt.Sprintf(`{"access_token":%q,"refresh_token":"rt","id_token":%q}`, access, idOther), "acc-from-id"},
		{"codex cli, account from access token", fmt.Sprintf(`{"tokens":{"access_token":%q,"refresh_token":"rt","account_id":null}}`, access), "acc-1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "auth.json")
			writeFile(t, path, tc.file)
			a := newAuthStore(path, "http://127.0.0.1:1", &http.Client{}, func() time.Time { return testNow })
			tok, account, err := a.token(context.Background(), "")
			if err != nil || string(tok) != access || account != tc.wantAccount {
				t.Errorf("token() = _, %q, %v; want the access token and %q", account, err, tc.wantAccount)
			}
			if !a.loggedIn() {
				t.Error("loggedIn() = false; want true")
			}
		})
	}
}

func TestCorruptFile(t *testing.T) {
	tests := []struct{ name, file string }{
		{"bad json", `{"tokens": {"access_token": "abc"`},
		{"not a jwt", `{"tokens":{"access_token":"not-a-jwt","refresh_token":"rt"}}`},
		{"bad jwt payload", `{"tokens":{"access_token":"a.%%%.c","refresh_token":"rt"}}`},
		{"tokens not an object", `{"tokens":"oops"}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fake := newFakeOAuth(t, testNow)
			dir := t.TempDir()
			path := filepath.Join(dir, "auth.json")
			writeFile(t, path, tc.file)
			a := newTestAuthStore(fake, path)
			if _, _, err := a.token(context.Background(), "rejected"); err == nil || !strings.Contains(err.Error(), path) {
				t.Errorf("token() error = %v; want one naming %s", err, path)
			}
			if a.loggedIn() {
				t.Error("loggedIn() = true; want false")
			}
			err := runAuth(context.Background(), []string{"status"}, func(k string) string { return map[string]string{"CODEX_HOME": dir}[k] },
				strings.NewReader(""), io.Discard, io.Discard)
			if err == nil || !strings.Contains(err.Error(), path) {
				t.Errorf("auth status error = %v; want one naming %s", err, path)
			}
			if got, _ := os.ReadFile(path); string(got) != tc.file {
				t.Errorf("file changed to %q", got)
			}
			if n := fake.refreshCount(); n != 0 {
				t.Errorf("refresh requests = %d; want 0", n)
			}
		})
	}
}

func TestMissingFile(t *testing.T) {
	a := newAuthStore(filepath.Join(t.TempDir(), "auth.json"), "http://127.0.0.1:1", &http.Client{}, time.Now)
	_, _, err := a.token(context.Background(), "")
	if !errors.Is(err, errLoginRequired) || err.Error() != "not logged in: run `ccproxy auth login-openai`" {
		t.Errorf("token() error = %v; want errLoginRequired saying how to log in", err)
	}
	if a.loggedIn() {
		t.Error("loggedIn() = true; want false")
	}
}

// runAuthIn runs `ccproxy auth args...` with CODEX_HOME=dir.
func runAuthIn(t *testing.T, dir, stdin string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	env := map[string]string{"CODEX_HOME": dir, "CCPROXY_AUTH_URL": "http://127.0.0.1:1"}
	var out, errOut bytes.Buffer
	err = runAuth(context.Background(), args, func(k string) string { return env[k] }, strings.NewReader(stdin), &out, &errOut)
	return out.String(), errOut.String(), err
}

func TestStatusAndInfo(t *testing.T) {
	loggedIn := t.TempDir()
	path := filepath.Join(loggedIn, "auth.json")
	// The half hour keeps "9d4h" stable however long the test takes.
	access := chatgptJWT(t, "a", time.Now().Add(9*24*time.Hour+4*time.Hour+30*time.Minute))
	writeFile(t, path, codexAuthJSON(access, "rt-1", chatgptJWT(t, "id", time.Now())))
	missing := filepath.Join(t.TempDir(), "none")

	tests := []struct {
		name     string
		dir      string
		args     []string
		want     []string // substrings (regexps) of stdout
		wantExit error
	}{
		{"status", loggedIn, []string{"status"},
			[]string{`^logged in as user@example\.com \(plus\), token valid for 9d4h, ` + regexp.QuoteMeta(path) + `\n$`}, nil},
		{"status json", loggedIn, []string{"status", "--json"},
			[]string{`"logged_in": true`, `"plan": "plus"`, `"email": "user@example.com"`, `"expires_in_seconds": 7`}, nil},
		{"status not logged in", missing, []string{"status"}, []string{"^not logged in: run `ccproxy auth login-openai`"}, exitStatus(1)},
		{"status json not logged in", missing, []string{"status", "--json"}, []string{`"logged_in": false`}, exitStatus(1)},
		{"info", loggedIn, []string{"openai-info"}, []string{
			`plan: +PLUS\n`, `account id: +acc-1\n`, `email: +user@example\.com\n`, `token expires: +\S+Z \(token valid for 9d4h\)\n`,
			`auth file: +` + regexp.QuoteMeta(path) + `\n`, `refresh token: +yes\n`, `last refresh: +2025-12-28T20:40:58Z\n`,
			`access token: +` + regexp.QuoteMeta(access[:8]) + `…\n`}, nil},
		{"info json", loggedIn, []string{"openai-info", "--json"}, []string{
			`"account_id": "acc-1"`, `"refresh_token_present": true`, `"access_token_prefix": "` + access[:8] + `"`,
			`"last_refresh": "2025-12-28T20:40:58Z"`}, nil},
		{"info not logged in", missing, []string{"openai-info"}, []string{"^not logged in"}, exitStatus(1)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			stdout, _, err := runAuthIn(t, tc.dir, "", tc.args...)
			if fmt.Sprint(err) != fmt.Sprint(tc.wantExit) {
				t.Errorf("error = %v; want %v", err, tc.wantExit)
			}
			for _, re := range tc.want {
				if !regexp.MustCompile(re).MatchString(stdout) {
					t.Errorf("stdout = %q; want a match for %s", stdout, re)
				}
			}
			if strings.Contains(stdout, access) {
				t.Error("stdout holds the whole access token")
			}
		})
	}
}

func TestLogout(t *testing.T) {
	tokens := codexAuthJSON(chatgptJWT(t, "a", testNow), "rt-1", "")
	withExtra := strings.Replace(tokens, `"auth_mode"`, `"custom": 42, "auth_mode"`, 1)
	tests := []struct {
		name, file, stdin string
		args              []string
		wantFile          string // "" when the file must be gone
	}{
		{"yes, nothing else left", tokens, "", []string{"logout", "--yes"}, ""},
		{"yes, other fields kept", withExtra, "", []string{"logout", "--yes"}, `{"custom":42}`},
		{"confirmed", tokens, "y\n", []string{"logout"}, ""},
		{"declined", tokens, "n\n", []string{"logout"}, tokens},
		{"no answer", tokens, "", []string{"logout"}, tokens},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "auth.json")
			writeFile(t, path, tc.file)
			_, stderr, err := runAuthIn(t, dir, tc.stdin, tc.args...)
			if err != nil {
				t.Fatalf("logout: %v", err)
			}
			asked := strings.Contains(stderr, "this also logs out the Codex CLI; continue? [y/N]")
			if want := len(tc.args) == 1; asked != want {
				t.Errorf("asked for confirmation = %v; want %v", asked, want)
			}
			data, err := os.ReadFile(path)
			switch {
			case tc.wantFile == "" && !errors.Is(err, os.ErrNotExist):
				t.Errorf("auth.json still exists (%v): %s", err, data)
			case tc.wantFile == tc.file && string(data) != tc.file:
				t.Errorf("auth.json = %s; want it unchanged", data)
			case tc.wantFile != "" && tc.wantFile != tc.file:
				var got bytes.Buffer
				json.Compact(&got, data)
				if got.String() != tc.wantFile {
					t.Errorf("auth.json = %s; want %s", got.String(), tc.wantFile)
				}
			}
		})
	}
}

func TestRunAuthUsage(t *testing.T) {
	dir := t.TempDir()
	var ue *exitError
	tests := []struct {
		name  string
		args  []string
		check func(err error) bool
		want  string
	}{
		{"no command", nil, func(err error) bool { return errors.As(err, &ue) }, "usage error"},
		{"unknown command", []string{"frobnicate"}, func(err error) bool { return errors.As(err, &ue) }, "usage error"},
		{"stray argument", []string{"status", "extra"}, func(err error) bool { return errors.As(err, &ue) }, "usage error"},
		{"bad flag", []string{"status", "--bogus"}, func(err error) bool { return errors.As(err, &ue) && ue.code == 2 && ue.msg == "" }, "exit status 2"},
		{"flag of another command", []string{"logout", "--json"}, func(err error) bool { return errors.As(err, &ue) && ue.code == 2 && ue.msg == "" }, "exit status 2"},
		{"help", []string{"login-openai", "-h"}, func(err error) bool { return err == nil }, "nil"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := runAuthIn(t, dir, "", tc.args...)
			if !tc.check(err) {
				t.Errorf("runAuth(%q) = %v; want %s", tc.args, err, tc.want)
			}
		})
	}
	if _, stderr, _ := runAuthIn(t, dir, "", "status", "-h"); !strings.Contains(stderr, "--callback-port") || !strings.Contains(stderr, "CCPROXY_AUTH_URL") {
		t.Errorf("-h printed %q; want the auth usage", stderr)
	}
}

func TestParseTokenError(t *testing.T) {
	tests := []struct {
		name, body string
		status     int
		want       string
		permanent  bool
	}{
		{"nested", `{"error":{"message":"Your refresh token has already been used.","type":"invalid_request_error","param":null,"code":"refresh_token_reused"}}`,
			401, "http 401 refresh_token_reused: Your refresh token has already been used.", true},
		{"rfc 6749", `{"error":"invalid_grant","error_description":"code expired"}`, 400, "http 400 invalid_grant: code expired", true},
		{"expired code", `{"error":{"message":"expired","code":"refresh_token_expired"}}`, 400, "http 400 refresh_token_expired: expired", true},
		{"server error", `upstream connect error`, 503, "http 503: upstream connect error", false},
		{"rate limited", `{"error":"slow_down"}`, 429, "http 429 slow_down", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := parseTokenError(tc.status, []byte(tc.body))
			if e.Error() != tc.want || e.permanent() != tc.permanent {
				t.Errorf("parseTokenError = %q, permanent %v; want %q, %v", e.Error(), e.permanent(), tc.want, tc.permanent)
			}
		})
	}
}

func TestAuthFilePath(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		want string
	}{
		{"codex home", map[string]string{"CODEX_HOME": "/x/codex", "HOME": "/home/u"}, "/x/codex/auth.json"},
		{"home", map[string]string{"HOME": "/home/u"}, "/home/u/.codex/auth.json"},
		{"empty codex home", map[string]string{"CODEX_HOME": "", "HOME": "/home/u"}, "/home/u/.codex/auth.json"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := authFilePath(func(k string) string { return tc.env[k] })
			if err != nil || got != tc.want {
				t.Errorf("authFilePath = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

func TestSecretNotLogged(t *testing.T) {
	var buf bytes.Buffer
	slog.New(slog.NewTextHandler(&buf, nil)).Info("token", "access", secret("eyJ-very-secret"))
	if strings.Contains(buf.String(), "very-secret") || !strings.Contains(buf.String(), "REDACTED") {
		t.Errorf("log = %q; want the token redacted", buf.String())
	}
}

// FuzzAuthFile feeds arbitrary bytes to the credential-file reader. It must
// never panic, and a file it accepts must survive the writer: encoded and
// decoded again it holds the same tokens, account, claims and last refresh,
// and every field ccproxy does not own, unchanged.
func FuzzAuthFile(f *testing.F) {
	fixture, err := os.ReadFile("testdata/auth/codex-cli.json")
	if err != nil {
		f.Fatal(err)
	}
	access := chatgptJWT(f, "a", testNow.Add(time.Hour))
	for _, seed := range []string{
		string(fixture),
		codexAuthJSON(access, "rt-1", chatgptJWT(f, "id", testNow)),
		fmt.Sprintf(`{"access_token":%q,"refresh_token":"rt","expires_at":1767225600,"account_id":"acc-flat","custom":[1,"<&>"]}`, access),
		`{"OPENAI_API_KEY":"sk-only"}`,
		`{"tokens":{"access_token":"abc"`,
		`{"tokens":"oops"}`,
		`{"tokens":null,"access_token":5}`,
		`{"tokens":{"access_token":"a.%%%.c","refresh_token":"rt"}}`,
		`{"last_refresh":"yesterday"}`,
		`null`,
		`[]`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		a, err := decodeAuthFile(data)
		if err != nil {
			return
		}
		encoded := a.encode()
		b, err := decodeAuthFile(encoded)
		if err != nil {
			t.Fatalf("decodeAuthFile(encode()) = %v; encoded:\n%s", err, encoded)
		}
		if b.idToken != a.idToken || b.accessToken != a.accessToken || b.refreshToken != a.refreshToken || b.account() != a.account() {
			t.Errorf("tokens or account changed by a rewrite; encoded:\n%s", encoded)
		}
		if !b.lastRefresh.Equal(a.lastRefresh) || !b.expires.Equal(a.expires) || b.plan != a.plan || b.email != a.email {
			t.Errorf("last_refresh %v, expires %v, plan %q, email %q; want %v, %v, %q, %q",
				b.lastRefresh, b.expires, b.plan, b.email, a.lastRefresh, a.expires, a.plan, a.email)
		}
		// Fields ccproxy does not own, at the top level and in "tokens", compared as JSON values.
		owned := append([]string{"tokens", "last_refresh"}, flatTokenKeys...)
		for _, m := range []struct{ before, after map[string]json.RawMessage }{{a.doc, b.doc}, {a.tokens, b.tokens}} {
			for k, v := range m.before {
				var want, got any
				json.Unmarshal(v, &want)
				json.Unmarshal(m.after[k], &got)
				if !slices.Contains(owned, k) && !reflect.DeepEqual(got, want) {
					t.Errorf("field %q = %s after a rewrite; want %s", k, m.after[k], v)
				}
			}
		}
	})
}

// TestTokenRefreshWriteFailure: when the file cannot take a refresh (disk
// full), the rotated refresh token, the only valid one left, stays in
// memory, keeps serving, and reaches the file once writing works again, so
// the user is never logged out by a full disk.
func TestTokenRefreshWriteFailure(t *testing.T) {
	fake := newFakeOAuth(t, testNow.Add(time.Hour))
	path := filepath.Join(t.TempDir(), "auth.json")
	writeFile(t, path, codexAuthJSON(chatgptJWT(t, "old", testNow.Add(-time.Hour)), "rt-1", chatgptJWT(t, "id", testNow)))
	before, _ := os.ReadFile(path)
	a := newTestAuthStore(fake, path)
	diskFull := true
	a.write = func(p string, data []byte) error {
		if diskFull {
			return errors.New("no space left on device")
		}
		return writeFileAtomic(p, data)
	}
	ctx := context.Background()
	tok1, _, err := a.token(ctx, "")
	if err != nil {
		t.Fatalf("token() with a full disk = %v; want the refreshed token", err)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(after, before) {
		t.Errorf("auth.json changed although it could not be written:\n%s", after)
	}
	if tok2, _, err := a.token(ctx, ""); err != nil || tok2 != tok1 || fake.refreshCount() != 1 {
		t.Errorf("second token() = %v, same token %v, %d refreshes; want the kept token and 1 refresh", err, tok2 == tok1, fake.refreshCount())
	}
	diskFull = false
	if tok3, _, err := a.token(ctx, ""); err != nil || tok3 != tok1 {
		t.Fatalf("token() after the disk recovered = %v; want the kept token", err)
	}
	if got := readJSON(t, path)["tokens"].(map[string]any)["refresh_token"]; got != fake.refreshToken {
		t.Errorf("refresh token on disk = %v; want the rotated %s", got, fake.refreshToken)
	}
	// The saved rotated token still refreshes: nothing was spent twice.
	if _, _, err := a.token(ctx, string(tok1)); err != nil || fake.refreshCount() != 2 {
		t.Errorf("refresh after recovery = %v (%d refreshes); want success and 2", err, fake.refreshCount())
	}
}

// TestTokenAdoptsAfterReused: another client (the Codex CLI, which does not take ccproxy's lock)
// spends the refresh token first; the token server says "reused", and the tokens it wrote are
// adopted instead of logging the user out.
func TestTokenAdoptsAfterReused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "auth.json")
	writeFile(t, path, codexAuthJSON(chatgptJWT(t, "old", testNow.Add(-time.Hour)), "rt-1", ""))
	fresh := chatgptJWT(t, "codex", testNow.Add(time.Hour))
	oauth := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeFile(t, path, codexAuthJSON(fresh, "rt-2", "")) // the Codex CLI's refresh lands
		w.WriteHeader(401)
		io.WriteString(w, `{"error":{"message":"Your refresh token has already been used to generate a new access token.","code":"refresh_token_reused"}}`)
	}))
	defer oauth.Close()
	a := newAuthStore(path, oauth.URL, oauth.Client(), func() time.Time { return testNow })
	tok, _, err := a.token(context.Background(), "")
	if err != nil || string(tok) != fresh {
		t.Errorf("token() = %.12q, %v; want the token the other client wrote", tok, err)
	}
}
