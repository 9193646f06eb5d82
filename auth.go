// This file holds the ChatGPT login: the credential file shared with the Codex CLI, the token
// provider the proxy uses, and the `ccproxy auth` commands. The OAuth client and the file layout
// are the Codex CLI's (openai/codex: codex-rs/login/src/server.rs, codex-rs/login/src/auth/storage.rs).

package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"html"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/oauth2"
)

const (
	defaultIssuer       = "https://auth.openai.com"      // DEFAULT_ISSUER in Codex
	oauthClientID       = "app_EMoamEEZ73f0CkXaXp7hrann" // the Codex CLI's public client
	defaultCallbackPort = 1455                           // the server accepts only its redirect URIs
	lockFileName        = ".ccproxy-auth.lock"
	refreshSkew         = 5 * time.Minute  // refresh this long before exp: no token expires in flight
	lockTimeout         = 30 * time.Second // a refresh takes seconds: longer means stuck
	refreshTimeout      = time.Minute      // bounds a refresh once sent (see authStore.refresh)
	deviceTimeout       = 15 * time.Minute // how long a device code stays usable, as in Codex
)

const authUsage = `Usage: ccproxy auth COMMAND [flags]

Log in with a ChatGPT Plus/Pro account. The credentials live in
$CODEX_HOME/auth.json (default ~/.codex/auth.json) and are shared with the
Codex CLI: logging in or out here does the same for the Codex CLI.

Commands:
  login-openai [flags]   log in with ChatGPT
      --auth-url URL       OAuth issuer (env CCPROXY_AUTH_URL, default https://auth.openai.com)
      --callback-port N    local port of the browser redirect (default 1455, 0 picks a free port)
      --no-browser         print the login URL instead of opening a browser, and also accept
                           the final redirect URL pasted on standard input (for SSH sessions)
      --device             log in with a device code instead; enable device code login in
                           ChatGPT's security settings first
  status [--json]        one line: logged in or not, plan, how long the token stays valid;
                         exits 1 when not logged in
  openai-info [--json]   plan, account id, email, token expiry, file location, whether a
                         refresh token is present, last refresh
  logout [--yes]         remove the tokens from auth.json; asks first unless --yes, because
                         this also logs out the Codex CLI

Environment:
  CODEX_HOME         directory of auth.json (default ~/.codex)
  CCPROXY_AUTH_URL   OAuth issuer (default https://auth.openai.com)
`

// errLoginRequired is wrapped by every error that only a new login can fix, so
// callers can answer 401, not 502. Its text is the next step for the user.
var errLoginRequired = errors.New("run `ccproxy auth login-openai`")

// secret is a token held in memory. Its LogValue keeps it out of every log.
type secret string

func (secret) LogValue() slog.Value { return slog.StringValue("REDACTED") }

// authFilePath is $CODEX_HOME/auth.json, or ~/.codex/auth.json, as in the Codex CLI.
func authFilePath(getenv func(string) string) (string, error) {
	if dir := getenv("CODEX_HOME"); dir != "" {
		return filepath.Join(dir, "auth.json"), nil
	}
	if home := getenv("HOME"); home != "" {
		return filepath.Join(home, ".codex", "auth.json"), nil
	}
	return "", errors.New("find auth file: $HOME is not set (set CODEX_HOME)")
}

type jwtClaims struct {
	Exp   int64  `json:"exp"`
	Email string `json:"email"`
	Auth  struct {
		AccountID string `json:"chatgpt_account_id"`
		Plan      string `json:"chatgpt_plan_type"`
	} `json:"https://api.openai.com/auth"`
	Profile struct {
		Email string `json:"email"`
	} `json:"https://api.openai.com/profile"`
}

// parseJWT decodes the claims of the JWT named name (none for ""); errors never quote it. The
// signature is not checked: the token comes from our file or the issuer over TLS, and only the
// issuer acts on it.
func parseJWT(name string, token secret) (c jwtClaims, err error) {
	if token == "" {
		return c, nil
	}
	parts := strings.Split(string(token), ".")
	if len(parts) != 3 {
		return c, fmt.Errorf("%s: not a JWT", name)
	}
	payload, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[1], "="))
	if err == nil {
		err = json.Unmarshal(payload, &c)
	}
	if err != nil {
		return c, fmt.Errorf("%s: malformed JWT: %w", name, err)
	}
	return c, nil
}

// tokenFields are the token fields of auth.json (inside "tokens" in the Codex
// CLI layout, at the top level in the flat layout) and of a refresh answer.
type tokenFields struct {
	IDToken      string `json:"id_token"`
	AccessToken  string `json:"access_token"`
	RefreshToken string `json:"refresh_token"`
	AccountID    string `json:"account_id"`
}

// flatTokenKeys are the top-level fields of the flat layout.
var flatTokenKeys = []string{"id_token", "access_token", "refresh_token", "account_id", "expires_at"}

// authFile is a parsed auth.json. doc and tokens keep every field as read so
// that a rewrite preserves what the Codex CLI (or a later version) put there.
type authFile struct {
	idToken, accessToken, refreshToken secret
	accountID                          string    // as stored; see account
	lastRefresh                        time.Time // zero when absent
	claimAccount, plan, email          string    // from the JWTs (see parseClaims)
	expires                            time.Time // of the access token; zero when unknown

	doc, tokens map[string]json.RawMessage // the top-level fields and those of "tokens"
}

// decodeAuthFile parses auth.json in either layout.
func decodeAuthFile(data []byte) (*authFile, error) {
	var v struct {
		tokenFields              // the flat layout
		Tokens      *tokenFields `json:"tokens"`
		LastRefresh time.Time    `json:"last_refresh"` // RFC 3339; zero when absent or null
	}
	f := &authFile{}
	if err := json.Unmarshal(data, &f.doc); err != nil {
		return nil, err
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return nil, err
	}
	t := v.tokenFields
	if v.Tokens != nil {
		t = *v.Tokens
		if err := json.Unmarshal(f.doc["tokens"], &f.tokens); err != nil {
			return nil, err
		}
	}
	f.idToken, f.accessToken = secret(t.IDToken), secret(t.AccessToken)
	f.refreshToken, f.accountID = secret(t.RefreshToken), t.AccountID
	// It is written back in UTC, which must keep a four-digit year, or the file
	// would not read back ("9999-12-31T23:59:59-23:00" is year 10000 in UTC).
	if f.lastRefresh = v.LastRefresh.UTC(); f.lastRefresh.Year() > 9999 || f.lastRefresh.Year() < 0 {
		return nil, errors.New("last_refresh: year out of range")
	}
	return f, f.parseClaims()
}

// parseClaims reads the account details from the JWTs: plan and email from
// the id_token first, as Codex does, the expiry from the access token.
func (f *authFile) parseClaims() error {
	access, err := parseJWT("access_token", f.accessToken)
	if err != nil {
		return err
	}
	id, err := parseJWT("id_token", f.idToken)
	if err != nil {
		return err
	}
	f.claimAccount = cmp.Or(id.Auth.AccountID, access.Auth.AccountID)
	f.plan = cmp.Or(id.Auth.Plan, access.Auth.Plan)
	f.email = cmp.Or(id.Email, id.Profile.Email, access.Email, access.Profile.Email)
	f.expires = time.Time{}
	if access.Exp != 0 {
		f.expires = time.Unix(access.Exp, 0)
	}
	return nil
}

// account is the ChatGPT account id: tokens.account_id, which Codex sends, else the JWT claim.
func (f *authFile) account() string { return cmp.Or(f.accountID, f.claimAccount) }

// encode renders f in the Codex CLI layout, keeping every field it does not know.
// It cannot fail: every value is a string, null or parsed JSON.
func (f *authFile) encode() []byte {
	doc, tokens := map[string]json.RawMessage{}, map[string]json.RawMessage{}
	maps.Copy(doc, f.doc)
	maps.Copy(tokens, f.tokens)
	for _, k := range flatTokenKeys {
		delete(doc, k) // the flat layout's fields now live in "tokens"
	}
	var account any // Codex writes null when it has no account id
	if a := f.account(); a != "" {
		account = a
	}
	for k, v := range map[string]any{"id_token": f.idToken, "access_token": f.accessToken,
		"refresh_token": f.refreshToken, "account_id": account} {
		tokens[k], _ = json.Marshal(v)
	}
	doc["tokens"], _ = json.Marshal(tokens)
	doc["last_refresh"], _ = json.Marshal(f.lastRefresh.UTC().Format(time.RFC3339Nano))
	if _, ok := doc["OPENAI_API_KEY"]; !ok {
		doc["OPENAI_API_KEY"] = json.RawMessage("null") // Codex always writes the key
	}
	data, _ := json.MarshalIndent(doc, "", "  ")
	return data
}

// readAuthFile reads and parses path. A missing file, or one without a ChatGPT
// login (only an OPENAI_API_KEY), is an errLoginRequired; other errors name it.
func readAuthFile(path string) (*authFile, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("not logged in: %w", errLoginRequired)
	}
	var f *authFile
	if err == nil {
		f, err = decodeAuthFile(data)
	}
	if err != nil {
		return nil, fmt.Errorf("read auth file %s: %w", path, err)
	}
	if f.accessToken == "" && f.refreshToken == "" {
		return nil, fmt.Errorf("no ChatGPT login in %s: %w", path, errLoginRequired)
	}
	return f, nil
}

// readDoc reads auth.json as raw JSON fields, for the commands that must work
// even when its tokens do not parse (login, logout). A missing file is empty.
func readDoc(path string) (map[string]json.RawMessage, error) {
	var doc map[string]json.RawMessage
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		data, err = []byte("{}"), nil
	}
	if err == nil {
		err = json.Unmarshal(data, &doc)
	}
	if err != nil {
		return nil, fmt.Errorf("read auth file %s: %w", path, err)
	}
	if doc == nil { // the file says null
		doc = map[string]json.RawMessage{}
	}
	return doc, nil
}

// lockAuthFile takes ccproxy's lock beside the credential file, held across a read, a refresh
// and a write, so that two ccproxy processes never spend the single-use refresh token twice.
// The Codex CLI locks with flock, which has no portable counterpart; adopt covers its refreshes.
func lockAuthFile(ctx context.Context, path string) (unlock func(), err error) {
	ctx, cancel := context.WithTimeout(ctx, lockTimeout)
	defer cancel()
	unlock, err = lockFile(ctx, filepath.Join(filepath.Dir(path), lockFileName), 2*refreshTimeout)
	if err != nil {
		return nil, fmt.Errorf("lock auth file: %w", err)
	}
	return unlock, nil
}

// rollForward recovers a refresh cut short between its answer and the rename that saves it
// (power loss, kill -9): a complete temp file newer than auth.json holds the only live refresh
// token, so it replaces auth.json; other temp files are removed. It runs when serve starts.
func rollForward(path string) {
	unlock, err := lockAuthFile(context.Background(), path)
	if err != nil {
		return
	}
	defer unlock()
	entries, _ := os.ReadDir(filepath.Dir(path))
	current, _ := readAuthFile(path)
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), "."+filepath.Base(path)+".tmp") {
			continue
		}
		tmp := filepath.Join(filepath.Dir(path), e.Name())
		b, err := os.ReadFile(tmp)
		f, derr := decodeAuthFile(b)
		if err == nil && derr == nil && f.refreshToken != "" &&
			(current == nil || f.lastRefresh.After(current.lastRefresh)) && os.Rename(tmp, path) == nil {
			current = f
			continue
		}
		os.Remove(tmp)
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	select {
	case <-time.After(d): // no leak: since Go 1.23 an unfired timer is collected
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// tokenError is a failed answer from the OAuth server, in either shape seen: OpenAI's nested
// {"error":{"message","type","code"}} or RFC 6749 section 5.2's {"error","error_description"}.
type tokenError struct {
	status            int
	code, description string
}

func (e *tokenError) Error() string {
	msg := strings.TrimSpace(fmt.Sprintf("http %d %s", e.status, e.code))
	if e.description != "" {
		msg += ": " + e.description
	}
	return msg
}

// permanent reports whether only a new login can fix the failure: a refresh
// token that was used, expired or revoked, or any 401 (as Codex decides).
func (e *tokenError) permanent() bool {
	switch e.code {
	case "refresh_token_reused", "refresh_token_expired", "refresh_token_invalidated", "invalid_grant":
		return true
	}
	return e.status == http.StatusUnauthorized
}

func parseTokenError(status int, body []byte) *tokenError {
	e := &tokenError{status: status}
	var v struct {
		Error            json.RawMessage `json:"error"`
		ErrorDescription string          `json:"error_description"`
	}
	if json.Unmarshal(body, &v) != nil {
		e.description = strings.TrimSpace(string(body[:min(len(body), 200)]))
		return e
	}
	var nested struct{ Message, Code string }
	if json.Unmarshal(v.Error, &e.code) != nil && json.Unmarshal(v.Error, &nested) == nil {
		e.code, e.description = nested.Code, nested.Message
	}
	e.description = cmp.Or(e.description, v.ErrorDescription)
	return e
}

// postJSON POSTs in as JSON to url and decodes a 2xx answer into out; other statuses are a *tokenError.
func postJSON(ctx context.Context, client *http.Client, url string, in map[string]string, out any) error {
	body, _ := json.Marshal(in) // a map of strings always marshals
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	switch {
	case err != nil:
		return err
	case resp.StatusCode/100 != 2:
		return parseTokenError(resp.StatusCode, data)
	}
	return json.Unmarshal(data, out)
}

// authStore gives the proxy a valid access token without ever spending the shared refresh token
// twice: one refresh at a time in this process (sem) and across processes (the file lock), with
// the file re-read under the lock, so a refresh by the Codex CLI is adopted, not repeated. It is
// not an oauth2.TokenSource: oauth2.RetrieveError does not parse the server's nested errors,
// the answer may omit any token, and the cache that matters is the file shared with Codex.
type authStore struct {
	path, issuer string
	client       *http.Client
	now          func() time.Time
	write        func(path string, data []byte) error // writeFileAtomic; tests make it fail
	sem          chan struct{}                        // a channel, so that waiters honour ctx
	cached       atomic.Pointer[cachedAuth]           // the parsed file, valid while its stat is unchanged
	// unsaved holds refreshed tokens the file could not take (disk full): the refresh token on
	// disk is spent, so these are the only ones left. Every call serves them and retries the write.
	unsaved atomic.Pointer[authFile]
}

func newAuthStore(path, issuer string, client *http.Client, now func() time.Time) *authStore {
	return &authStore{path: path, issuer: issuer, client: client, now: now, write: writeFileAtomic,
		sem: make(chan struct{}, 1)}
}

// token returns a valid access token and the ChatGPT account id. rejected, when
// non-empty, is an access token the upstream just answered 401 to: refresh,
// unless the current token already differs from it (someone else refreshed).
func (a *authStore) token(ctx context.Context, rejected string) (access secret, accountID string, err error) {
	f, err := a.read()
	if u := a.unsaved.Load(); u != nil {
		f, err = u, nil
		if unlock, lerr := lockAuthFile(ctx, a.path); lerr == nil {
			if a.write(a.path, u.encode()) == nil {
				a.unsaved.CompareAndSwap(u, nil)
			}
			unlock()
		}
	}
	if err == nil && a.stale(f, rejected) {
		select {
		case a.sem <- struct{}{}:
		case <-ctx.Done():
			return "", "", ctx.Err()
		}
		f, err = a.refresh(ctx, rejected)
		<-a.sem
	}
	if err != nil {
		return "", "", err
	}
	return f.accessToken, f.account(), nil
}

// loggedIn reports cheaply (no network) whether the credential file holds tokens.
func (a *authStore) loggedIn() bool {
	_, err := a.read()
	return err == nil
}

type cachedAuth struct {
	f  *authFile
	fi os.FileInfo // the stat f was read at
}

// read returns the parsed credential file, re-reading it only when its stat changed: one
// stat per request instead of an open, a read and two JWT decodes. Writers replace the file
// by rename (a new inode) or rewrite it (a new mtime), so another process's refresh is seen.
func (a *authStore) read() (*authFile, error) {
	fi, err := os.Stat(a.path)
	if c := a.cached.Load(); err == nil && c != nil && os.SameFile(c.fi, fi) &&
		c.fi.ModTime().Equal(fi.ModTime()) && c.fi.Size() == fi.Size() {
		return c.f, nil
	}
	f, err := readAuthFile(a.path)
	if err == nil && fi != nil {
		a.cached.Store(&cachedAuth{f, fi})
	}
	return f, err
}

// stale reports whether f's access token must be refreshed. A token without
// exp is used until the upstream rejects it.
func (a *authStore) stale(f *authFile, rejected string) bool {
	if f.accessToken == "" || rejected != "" && string(f.accessToken) == rejected {
		return true
	}
	return !f.expires.IsZero() && !a.now().Add(refreshSkew).Before(f.expires)
}

// refresh, under the file lock, re-reads the file and, unless its token is fresh by now, spends
// the refresh token and writes the answer back.
func (a *authStore) refresh(ctx context.Context, rejected string) (*authFile, error) {
	unlock, err := lockAuthFile(ctx, a.path)
	if err != nil {
		return nil, err
	}
	defer unlock()
	f, err := readAuthFile(a.path)
	if u := a.unsaved.Load(); u != nil {
		c := *u // updated below, while other calls may be reading u
		f, err = &c, nil
	}
	if err != nil || !a.stale(f, rejected) {
		return f, err
	}
	if f.refreshToken == "" {
		return nil, fmt.Errorf("access token expired and %s has no refresh token: %w",
			a.path, errLoginRequired)
	}
	// From here the refresh token is spent. Were the answer dropped because the caller gave up,
	// the rotated refresh token would be lost and the user logged out: outlive ctx.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), refreshTimeout)
	defer cancel()
	var resp tokenFields
	req := map[string]string{"client_id": oauthClientID, "grant_type": "refresh_token",
		"refresh_token": string(f.refreshToken)}
	if err := postJSON(ctx, a.client, a.issuer+"/oauth/token", req, &resp); err != nil {
		if te, ok := errors.AsType[*tokenError](err); ok && te.permanent() {
			if g := a.adopt(ctx, f.refreshToken); g != nil {
				return g, nil
			}
			return nil, fmt.Errorf("refresh token no longer valid (%v): %w", te, errLoginRequired)
		}
		return nil, fmt.Errorf("refresh access token: %w", err)
	}
	// The answer may leave out any token: only those that came back are replaced.
	f.idToken = cmp.Or(secret(resp.IDToken), f.idToken)
	f.accessToken = cmp.Or(secret(resp.AccessToken), f.accessToken)
	f.refreshToken = cmp.Or(secret(resp.RefreshToken), f.refreshToken)
	f.lastRefresh = a.now()
	if err := f.parseClaims(); err != nil {
		return nil, fmt.Errorf("refresh access token: %w", err)
	}
	if err := a.write(a.path, f.encode()); err != nil {
		a.unsaved.Store(f) // keep the only copy of the rotated refresh token
		return f, nil
	}
	a.unsaved.Store(nil)
	return f, nil
}

// adopt returns what another client wrote when it spent the refresh token first (the Codex
// CLI does not take ccproxy's lock): the token server says "reused" as soon as the other
// refresh is done, and its write follows, so the file is watched for a few seconds.
func (a *authStore) adopt(ctx context.Context, spent secret) *authFile {
	for range 20 {
		if f, err := readAuthFile(a.path); err == nil && f.refreshToken != spent {
			return f
		}
		if sleepCtx(ctx, 100*time.Millisecond) != nil {
			return nil
		}
	}
	return nil
}

// login is one `auth login-openai` run.
type login struct {
	issuer, path string
	client       *http.Client
	now          func() time.Time
	stdin        io.Reader // read for a pasted redirect URL when openBrowser is nil
	stderr       io.Writer
	openBrowser  func(url string) error                           // nil with --no-browser
	wait         func(ctx context.Context, d time.Duration) error // between device-code polls
}

// oauthConfig is the Codex CLI's OAuth client. AuthStyleInParams because it is a
// public PKCE client: auto-detection would first try Basic auth with no secret.
func (l *login) oauthConfig(redirectURL string) *oauth2.Config {
	return &oauth2.Config{
		ClientID:    oauthClientID,
		RedirectURL: redirectURL,
		Scopes:      []string{"openid", "profile", "email", "offline_access"},
		Endpoint: oauth2.Endpoint{
			AuthURL:   l.issuer + "/oauth/authorize",
			TokenURL:  l.issuer + "/oauth/token",
			AuthStyle: oauth2.AuthStyleInParams,
		},
	}
}

// browser runs the authorization-code flow. The final redirect reaches a callback
// server on 127.0.0.1 or, with --no-browser, is pasted on stdin: one exchange.
func (l *login) browser(ctx context.Context, port int) error {
	ln, err := l.listen(ctx, port)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx) // stops a paste still being exchanged
	defer cancel()
	// The redirect host is "localhost": it is what the OAuth server has registered.
	cfg := l.oauthConfig(fmt.Sprintf("http://localhost:%d/auth/callback", ln.Addr().(*net.TCPAddr).Port))
	verifier := oauth2.GenerateVerifier() // fresh per attempt (RFC 7636 section 4.1)
	state := oauth2.GenerateVerifier()    // also 32 random bytes, base64url, as Codex's state
	results := make(chan error, 1)
	report := func(err error) { // the first outcome ends the login; later ones are dropped
		select {
		case results <- err:
		default:
		}
	}
	// exchange ends the login with a redirect's query, unless it lacks this attempt's
	// state (a stale tab, a forged link): then mine is false.
	exchange := func(q url.Values) (mine bool, err error) {
		if subtle.ConstantTimeCompare([]byte(q.Get("state")), []byte(state)) != 1 {
			return false, nil
		}
		if err = redirectError(q); err == nil {
			err = l.finish(ctx, cfg, q.Get("code"), verifier)
		}
		report(err)
		return true, err
	}
	stop := serveCallbacks(ln, exchange, report)
	defer stop()
	authURL := cfg.AuthCodeURL(state, oauth2.S256ChallengeOption(verifier),
		oauth2.SetAuthURLParam("id_token_add_organizations", "true"),
		oauth2.SetAuthURLParam("codex_cli_simplified_flow", "true"),
		oauth2.SetAuthURLParam("originator", "codex_cli_rs"))
	if l.openBrowser != nil {
		fmt.Fprintf(l.stderr, "opening a browser to log in; if none opens, visit:\n\n%s\n\n", authURL)
		if err := l.openBrowser(authURL); err != nil {
			fmt.Fprintf(l.stderr, "could not open a browser (%v); open the URL above yourself\n", err)
		}
	} else {
		fmt.Fprintf(l.stderr, "open this URL in a browser to log in:\n\n%s\n\nif the browser cannot reach "+
			"this machine, paste the URL it ends on (http://localhost:...) here\n", authURL)
		go l.readPastes(exchange)
	}
	select {
	case err := <-results:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// redirectError is the failure that the query of the final redirect reports, if any.
func redirectError(q url.Values) error {
	switch e, desc := q.Get("error"), q.Get("error_description"); {
	case e == "access_denied" && strings.Contains(desc, "missing_codex_entitlement"):
		return errors.New("login refused: Codex is not enabled for your workspace; " +
			"ask your ChatGPT workspace admin to enable it")
	case e != "":
		return fmt.Errorf("login refused: %s", strings.TrimSuffix(e+": "+desc, ": "))
	case q.Get("code") == "":
		return errors.New("login failed: the redirect carried no authorization code")
	}
	return nil
}

// serveCallbacks serves the final redirect on ln until stop, and /cancel for a later login.
func serveCallbacks(ln net.Listener, exchange func(url.Values) (bool, error),
	report func(error)) (stop func()) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /auth/callback", func(w http.ResponseWriter, r *http.Request) {
		switch mine, err := exchange(r.URL.Query()); {
		case !mine:
			writePage(w, http.StatusBadRequest, "State mismatch",
				"This link is not from the current login. Run ccproxy auth login-openai again.")
		case err != nil:
			writePage(w, http.StatusBadRequest, "Login failed", err.Error())
		default:
			writePage(w, http.StatusOK, "Logged in",
				"ccproxy is logged in with your ChatGPT account. You can close this tab.")
		}
	})
	mux.HandleFunc("GET /cancel", func(w http.ResponseWriter, r *http.Request) {
		writePage(w, http.StatusOK, "Login cancelled", "Another login took over.")
		report(errors.New("login cancelled by another login"))
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	return func() {
		// Shutdown, not Close, so the page of the request that ended the login is delivered.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}
}

// readPastes exchanges redirect URLs pasted on stdin until one carries the login's state.
func (l *login) readPastes(exchange func(url.Values) (bool, error)) {
	for sc := bufio.NewScanner(l.stdin); sc.Scan(); {
		line := strings.TrimSpace(sc.Text())
		u, err := url.Parse(line)
		switch {
		case line == "":
		case err != nil || !u.Query().Has("state"):
			fmt.Fprintln(l.stderr, "that is not the redirect URL; "+
				"paste the whole address from the browser's address bar")
		default:
			if mine, _ := exchange(u.Query()); mine {
				return // the outcome, success or not, has been reported
			}
			fmt.Fprintln(l.stderr, "state mismatch: that URL is from another login attempt")
		}
	}
}

// listen binds the callback port on 127.0.0.1. A busy port is usually a login left
// running: like Codex, ask it to /cancel, then retry.
func (l *login) listen(ctx context.Context, port int) (net.Listener, error) {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	ln, err := net.Listen("tcp", addr)
	if err == nil || port == 0 {
		return ln, err
	}
	cancelURL := "http://" + addr + "/cancel"
	if req, rerr := http.NewRequestWithContext(ctx, http.MethodGet, cancelURL, nil); rerr == nil {
		if resp, rerr := l.client.Do(req); rerr == nil {
			resp.Body.Close()
		}
	}
	for range 10 {
		if err := sleepCtx(ctx, 200*time.Millisecond); err != nil {
			return nil, err
		}
		if ln, err = net.Listen("tcp", addr); err == nil {
			return ln, nil
		}
	}
	return nil, fmt.Errorf("listen for the login callback: %w", err)
}

// finish trades an authorization code for tokens and saves them, keeping the file's other fields.
// It sets ChatGPT mode as Codex's login does: an OPENAI_API_KEY left in the file would win.
func (l *login) finish(ctx context.Context, cfg *oauth2.Config, code, verifier string) error {
	ctx = context.WithValue(ctx, oauth2.HTTPClient, l.client)
	tok, err := cfg.Exchange(ctx, code, oauth2.VerifierOption(verifier))
	if re, ok := errors.AsType[*oauth2.RetrieveError](err); ok {
		err = parseTokenError(re.Response.StatusCode, re.Body)
	}
	var f *authFile
	if err == nil {
		idToken, _ := tok.Extra("id_token").(string)
		f = &authFile{idToken: secret(idToken), accessToken: secret(tok.AccessToken),
			refreshToken: secret(tok.RefreshToken), lastRefresh: l.now()}
		err = f.parseClaims()
	}
	if err != nil {
		return fmt.Errorf("exchange authorization code: %w", err)
	}
	unlock, err := lockAuthFile(ctx, l.path)
	if err != nil {
		return err
	}
	defer unlock()
	if f.doc, err = readDoc(l.path); err != nil {
		return fmt.Errorf("%w (move it aside to log in)", err)
	}
	delete(f.doc, "tokens") // the old login's token fields go with it
	f.doc["OPENAI_API_KEY"] = json.RawMessage("null")
	f.doc["auth_mode"] = json.RawMessage(`"chatgpt"`)
	return writeFileAtomic(l.path, f.encode())
}

// device runs the device-code flow: the user enters a code at {issuer}/codex/device;
// polling then yields an authorization code and its verifier.
func (l *login) device(ctx context.Context) error {
	var uc struct {
		DeviceAuthID string          `json:"device_auth_id"`
		UserCode     string          `json:"user_code"`
		UserCodeAlt  string          `json:"usercode"` // older servers' spelling
		Interval     json.RawMessage `json:"interval"` // seconds, as a string or a number
	}
	hint := "device code login must be enabled in ChatGPT's security settings"
	req := map[string]string{"client_id": oauthClientID}
	if err := postJSON(ctx, l.client, l.issuer+"/api/accounts/deviceauth/usercode", req, &uc); err != nil {
		return fmt.Errorf("request device code: %w (%s)", err, hint)
	}
	userCode := cmp.Or(uc.UserCode, uc.UserCodeAlt)
	interval := 5 * time.Second
	if n, err := strconv.Atoi(strings.Trim(string(uc.Interval), `"`)); err == nil && n > 0 {
		interval = time.Duration(n) * time.Second
	}
	fmt.Fprintf(l.stderr, "to log in, open %s/codex/device and enter this code:\n\n    %s\n\n"+
		"(%s; the code expires in 15 minutes)\n", l.issuer, userCode, hint)
	ctx, cancel := context.WithTimeout(ctx, deviceTimeout)
	defer cancel()
	for {
		var tok struct {
			AuthorizationCode string `json:"authorization_code"`
			CodeVerifier      string `json:"code_verifier"`
		}
		req := map[string]string{"device_auth_id": uc.DeviceAuthID, "user_code": userCode}
		err := l.wait(ctx, interval)
		if err == nil {
			err = postJSON(ctx, l.client, l.issuer+"/api/accounts/deviceauth/token", req, &tok)
		}
		if te, ok := errors.AsType[*tokenError](err); ok &&
			(te.status == http.StatusForbidden || te.status == http.StatusNotFound) {
			continue // not entered yet
		}
		if err != nil {
			return fmt.Errorf("wait for device code login: %w", err)
		}
		cfg := l.oauthConfig(l.issuer + "/deviceauth/callback")
		return l.finish(ctx, cfg, tok.AuthorizationCode, tok.CodeVerifier)
	}
}

func writePage(w http.ResponseWriter, status int, title, message string) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	fmt.Fprintf(w, "<!doctype html>\n"+
		`<html><head><meta charset="utf-8"><title>ccproxy: %[1]s</title></head>`+"\n"+
		`<body style="font-family:system-ui,sans-serif;max-width:36em;margin:4em auto">`+
		"<h1>%[1]s</h1><p>%[2]s</p></body></html>\n", html.EscapeString(title), html.EscapeString(message))
}

// openBrowser shows url in the desktop's browser without waiting for it.
func openBrowser(url string) error {
	name := "xdg-open"
	if runtime.GOOS == "darwin" {
		name = "open"
	}
	cmd := exec.Command(name, url)
	if err := cmd.Start(); err != nil {
		return err
	}
	go cmd.Wait() // reap the opener when it exits
	return nil
}

// runAuth runs `ccproxy auth SUBCOMMAND ...`; args are the words after "auth".
func runAuth(ctx context.Context, args []string, getenv func(string) string, stdin io.Reader,
	stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return usagef("auth needs a command: login-openai, status, openai-info or logout")
	}
	if args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprint(stdout, authUsage)
		return nil
	}
	path, err := authFilePath(getenv)
	if err != nil {
		return err
	}
	flags := flag.NewFlagSet("auth "+args[0], flag.ContinueOnError)
	flags.SetOutput(stderr)
	flags.Usage = func() { fmt.Fprint(stderr, authUsage) }
	issuer, port := cmp.Or(getenv("CCPROXY_AUTH_URL"), defaultIssuer), defaultCallbackPort
	var noBrowser, device, asJSON, yes bool
	switch args[0] { // each command accepts only its own flags
	case "login-openai":
		flags.StringVar(&issuer, "auth-url", issuer, "OAuth issuer")
		flags.IntVar(&port, "callback-port", port, "port of the login callback")
		flags.BoolVar(&noBrowser, "no-browser", false, "print the URL and accept a pasted redirect URL")
		flags.BoolVar(&device, "device", false, "log in with a device code")
	case "status", "openai-info":
		flags.BoolVar(&asJSON, "json", false, "print JSON")
	case "logout":
		flags.BoolVar(&yes, "yes", false, "do not ask for confirmation")
	default:
		return usagef("unknown auth command %q: want login-openai, status, openai-info or logout", args[0])
	}
	switch err := flags.Parse(args[1:]); {
	case errors.Is(err, flag.ErrHelp):
		return nil
	case err != nil:
		return exitStatus(2) // flags has printed the error
	case flags.NArg() > 0:
		return usagef("%s takes no arguments, got %q", flags.Name(), flags.Arg(0))
	}
	switch args[0] {
	case "status", "openai-info":
		return printStatus(stdout, path, time.Now(), args[0] == "openai-info", asJSON)
	case "logout":
		return logout(ctx, stdin, stdout, stderr, path, yes)
	}
	// Only short token-endpoint calls: the timeout keeps a hung issuer from hanging us.
	l := &login{issuer: strings.TrimRight(issuer, "/"), path: path, now: time.Now,
		client: &http.Client{Timeout: time.Minute}, stdin: stdin, stderr: stderr, wait: sleepCtx}
	if !noBrowser {
		l.openBrowser = openBrowser
	}
	return l.run(ctx, stdout, port, device)
}

// run logs in and says who is logged in now.
func (l *login) run(ctx context.Context, stdout io.Writer, port int, device bool) error {
	var err error
	if device {
		err = l.device(ctx)
	} else {
		err = l.browser(ctx, port)
	}
	if err != nil {
		return err
	}
	f, err := readAuthFile(l.path) // what was saved
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "logged in as %s (plan %s), credentials saved to %s\n",
		cmp.Or(f.email, "unknown email"), strings.ToUpper(cmp.Or(f.plan, "unknown")), l.path)
	return nil
}

// authSummary is what `auth status --json` and `auth openai-info --json` print.
type authSummary struct {
	LoggedIn         bool   `json:"logged_in"`
	Email            string `json:"email,omitempty"`
	Plan             string `json:"plan,omitempty"`
	AccountID        string `json:"account_id,omitempty"`
	ExpiresAt        string `json:"expires_at,omitempty"`
	ExpiresInSeconds int64  `json:"expires_in_seconds,omitempty"` // negative once expired
	RefreshToken     bool   `json:"refresh_token_present"`
	LastRefresh      string `json:"last_refresh,omitempty"`
	// Enough of the access token to tell two apart, useless to an attacker.
	AccessTokenPrefix string `json:"access_token_prefix,omitempty"`
	Path              string `json:"path"`
}

// printStatus prints `auth status` (one line) or `auth openai-info` (details) from
// the file alone, without network. Not logged in is exit status 1.
func printStatus(w io.Writer, path string, now time.Time, detailed, asJSON bool) error {
	f, err := readAuthFile(path)
	if err != nil && !errors.Is(err, errLoginRequired) {
		return err
	}
	s := authSummary{LoggedIn: err == nil, Path: path}
	valid := "token expiry unknown"
	if s.LoggedIn {
		s.Email, s.Plan, s.AccountID, s.RefreshToken = f.email, f.plan, f.account(), f.refreshToken != ""
		s.AccessTokenPrefix = string(f.accessToken[:min(8, len(f.accessToken))])
		if !f.lastRefresh.IsZero() {
			s.LastRefresh = f.lastRefresh.UTC().Format(time.RFC3339)
		}
		if exp := f.expires; !exp.IsZero() {
			s.ExpiresAt = exp.UTC().Format(time.RFC3339)
			s.ExpiresInSeconds = int64(exp.Sub(now) / time.Second)
			valid = "token valid for " + formatDuration(exp.Sub(now))
			if !exp.After(now) {
				valid = "token expired " + formatDuration(now.Sub(exp)) + " ago"
			}
		}
	}
	switch {
	case asJSON:
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(s); err != nil {
			return err
		}
	case !s.LoggedIn:
		fmt.Fprintf(w, "not logged in: %v (%s)\n", errLoginRequired, path)
	case detailed:
		for _, row := range [][2]string{
			{"plan", strings.ToUpper(s.Plan)},
			{"account id", s.AccountID},
			{"email", s.Email},
			{"token expires", cmp.Or(s.ExpiresAt, "unknown") + " (" + valid + ")"},
			{"auth file", path},
			{"refresh token", map[bool]string{true: "yes", false: "no"}[s.RefreshToken]},
			{"last refresh", cmp.Or(s.LastRefresh, "unknown")},
			{"access token", s.AccessTokenPrefix + "…"},
		} {
			fmt.Fprintf(w, "%-15s %s\n", row[0]+":", row[1])
		}
	default:
		fmt.Fprintf(w, "logged in as %s (%s), %s, %s\n",
			cmp.Or(s.Email, "unknown email"), cmp.Or(s.Plan, "unknown plan"), valid, path)
	}
	if !s.LoggedIn {
		return exitStatus(1)
	}
	return nil
}

// formatDuration renders d coarsely for people: 9d4h, 3h12m, 5m.
func formatDuration(d time.Duration) string {
	days, hours, minutes := int(d/(24*time.Hour)), int(d/time.Hour)%24, int(d/time.Minute)%60
	switch {
	case days > 0:
		return fmt.Sprintf("%dd%dh", days, hours)
	case hours > 0:
		return fmt.Sprintf("%dh%dm", hours, minutes)
	}
	return fmt.Sprintf("%dm", minutes)
}

// logout removes the login from the auth file, keeping other fields (or deleting an empty file).
// Unless yes, it asks first, as the Codex CLI is logged out too, and before taking the lock,
// which would stall the Codex CLI while the user types.
func logout(ctx context.Context, stdin io.Reader, stdout, stderr io.Writer, path string, yes bool) error {
	doc, err := readDoc(path)
	if err != nil {
		return err
	}
	if !slices.ContainsFunc([]string{"tokens", "access_token", "refresh_token"}, func(k string) bool {
		return doc[k] != nil && string(doc[k]) != "null"
	}) {
		fmt.Fprintln(stdout, "not logged in")
		return nil
	}
	if !yes {
		fmt.Fprint(stderr, "this also logs out the Codex CLI; continue? [y/N] ")
		answer, _ := bufio.NewReader(stdin).ReadString('\n')
		if a := strings.ToLower(strings.TrimSpace(answer)); a != "y" && a != "yes" {
			fmt.Fprintln(stderr, "logout cancelled")
			return nil
		}
	}
	unlock, err := lockAuthFile(ctx, path)
	if err != nil {
		return err
	}
	defer unlock()
	if doc, err = readDoc(path); err != nil { // again, under the lock
		return err
	}
	for _, k := range append([]string{"tokens", "last_refresh"}, flatTokenKeys...) {
		delete(doc, k)
	}
	// What a login wrote goes too, unless it was changed since.
	for k, v := range map[string]string{"auth_mode": `"chatgpt"`, "OPENAI_API_KEY": "null"} {
		if string(doc[k]) == v {
			delete(doc, k)
		}
	}
	if len(doc) == 0 {
		err = os.Remove(path)
	} else {
		data, _ := json.MarshalIndent(doc, "", "  ") // parsed JSON always marshals
		err = writeFileAtomic(path, data)
	}
	if err != nil {
		return fmt.Errorf("remove the tokens from %s: %w", path, err)
	}
	fmt.Fprintf(stdout, "logged out: tokens removed from %s\n", path)
	return nil
}
