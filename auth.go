// This file holds everything about the ChatGPT login: the credential file
// shared with the Codex CLI, the token provider the proxy uses, and the
// `ccproxy auth` commands. Facts about the OAuth server and the file layout
// come from codex-backend.md §1 and §2.
//
// It is Unix-only: the advisory lock shared with the Codex CLI is flock(2).

package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
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
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/oauth2"
)

const (
	// defaultIssuer is the OAuth server of ChatGPT accounts (DEFAULT_ISSUER in Codex).
	defaultIssuer = "https://auth.openai.com"
	// oauthClientID is the public client id of the Codex CLI; the server only
	// accepts the redirect URIs registered for it, hence port 1455.
	oauthClientID = "app_EMoamEEZ73f0CkXaXp7hrann"
	// defaultCallbackPort is the port of the redirect URI registered for oauthClientID.
	defaultCallbackPort = 1455
	// refreshSkew refreshes an access token this long before its JWT exp, so a
	// request never leaves with a token that expires on the way.
	refreshSkew = 5 * time.Minute
	// lockFileName is the lock file recent Codex CLI versions create next to
	// auth.json (codex-rs/login/src/auth/storage.rs, AUTH_STORAGE_LOCK_FILE_NAME).
	// They take it with fs2 lock_exclusive, which is flock(LOCK_EX) on Unix, the
	// same lock as ours. Codex holds it only while writing (its refresh then does
	// a compare-and-swap); holding it across our read-refresh-write makes a Codex
	// write wait for our refresh, which is what keeps the single-use refresh token
	// from being spent twice.
	lockFileName = ".auth-storage.lock"
	// lockTimeout bounds the wait for another process's lock; Codex holds it
	// for milliseconds, so a longer wait means something is stuck.
	lockTimeout = 30 * time.Second
	// refreshTimeout bounds a refresh once it has been sent (see authStore.refresh).
	refreshTimeout = time.Minute
	// deviceTimeout is how long a device code stays usable (15 minutes in Codex).
	deviceTimeout = 15 * time.Minute
	// loginHint is the next step in every "log in (again)" message.
	loginHint = "run `ccproxy auth login-openai`"
)

// authUsage is the help text of `ccproxy auth`.
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

// errLoginRequired is wrapped by every error that only a new login can fix,
// so callers can answer 401 instead of 502.
var errLoginRequired = errors.New("login required")

// loginError is an errLoginRequired carrying the reason the user sees.
type loginError struct{ reason string }

// Error says what happened and what to run.
func (e *loginError) Error() string { return e.reason + ": " + loginHint }

// Is makes errors.Is(err, errLoginRequired) true.
func (e *loginError) Is(target error) bool { return target == errLoginRequired }

// secret is a token held in memory. Its LogValue keeps it out of every log.
type secret string

// LogValue implements slog.LogValuer.
func (secret) LogValue() slog.Value { return slog.StringValue("REDACTED") }

// authFilePath is $CODEX_HOME/auth.json, or ~/.codex/auth.json, as in the Codex CLI.
func authFilePath(getenv func(string) string) (string, error) {
	if dir := getenv("CODEX_HOME"); dir != "" {
		return filepath.Join(dir, "auth.json"), nil
	}
	home := getenv("HOME")
	if home == "" {
		h, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("find auth file: %w (set CODEX_HOME)", err)
		}
		home = h
	}
	return filepath.Join(home, ".codex", "auth.json"), nil
}

// jwtClaims are the JWT claims ccproxy reads (codex-backend.md §1.7).
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

// parseJWT decodes the payload of a JWT. The signature is not checked: the
// token comes from our own file or straight from the issuer over TLS, and only
// the issuer's servers act on it. Errors never quote the token.
func parseJWT(token string) (jwtClaims, error) {
	var c jwtClaims
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return c, errors.New("not a JWT")
	}
	payload, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[1], "="))
	if err != nil {
		return c, fmt.Errorf("malformed JWT payload: %w", err)
	}
	if err := json.Unmarshal(payload, &c); err != nil {
		return c, fmt.Errorf("malformed JWT claims: %w", err)
	}
	return c, nil
}

// tokenFields are the token fields of auth.json: inside "tokens" in the Codex
// CLI layout, at the top level in the flat layout.
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
	id, access                         jwtClaims

	doc    map[string]json.RawMessage // top-level fields
	tokens map[string]json.RawMessage // fields of "tokens"
}

// decodeAuthFile parses auth.json in either layout.
func decodeAuthFile(data []byte) (*authFile, error) {
	var v struct {
		tokenFields              // the flat layout
		Tokens      *tokenFields `json:"tokens"`
		LastRefresh string       `json:"last_refresh"`
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
	f.idToken, f.accessToken, f.refreshToken, f.accountID = secret(t.IDToken), secret(t.AccessToken), secret(t.RefreshToken), t.AccountID
	if v.LastRefresh != "" {
		var err error
		if f.lastRefresh, err = time.Parse(time.RFC3339Nano, v.LastRefresh); err != nil {
			return nil, fmt.Errorf("last_refresh: %w", err)
		}
	}
	if err := f.parseClaims(); err != nil {
		return nil, err
	}
	return f, nil
}

// parseClaims fills id and access from the JWTs present.
func (f *authFile) parseClaims() error {
	var err error
	if f.accessToken != "" {
		if f.access, err = parseJWT(string(f.accessToken)); err != nil {
			return fmt.Errorf("access_token: %w", err)
		}
	}
	if f.idToken != "" {
		if f.id, err = parseJWT(string(f.idToken)); err != nil {
			return fmt.Errorf("id_token: %w", err)
		}
	}
	return nil
}

// hasTokens reports whether the file holds a ChatGPT login at all; a file
// with only an API key (OPENAI_API_KEY) does not.
func (f *authFile) hasTokens() bool { return f.accessToken != "" || f.refreshToken != "" }

// account is the ChatGPT account id: tokens.account_id, which is what Codex
// sends, else the id_token claim, else the access-token claim (peers' fallbacks).
func (f *authFile) account() string {
	return cmp.Or(f.accountID, f.id.Auth.AccountID, f.access.Auth.AccountID)
}

// plan is chatgpt_plan_type, read from the id_token first as Codex does.
func (f *authFile) plan() string { return cmp.Or(f.id.Auth.Plan, f.access.Auth.Plan) }

// email is the account's email address from whichever JWT carries it.
func (f *authFile) email() string {
	return cmp.Or(f.id.Email, f.id.Profile.Email, f.access.Email, f.access.Profile.Email)
}

// expires is the access token's expiry; zero when unknown.
func (f *authFile) expires() time.Time {
	if f.access.Exp == 0 {
		return time.Time{}
	}
	return time.Unix(f.access.Exp, 0)
}

// encode renders f in the Codex CLI layout (codex-backend.md §2), whatever
// layout it was read in, keeping every field it does not know.
func (f *authFile) encode() ([]byte, error) {
	doc := maps.Clone(f.doc)
	if doc == nil {
		doc = map[string]json.RawMessage{}
	}
	for _, k := range flatTokenKeys {
		delete(doc, k) // the flat layout's fields now live in "tokens"
	}
	tokens := maps.Clone(f.tokens)
	if tokens == nil {
		tokens = map[string]json.RawMessage{}
	}
	var account any // Codex writes null when it has no account id
	if a := f.account(); a != "" {
		account = a
	}
	for k, v := range map[string]any{
		"id_token":      string(f.idToken),
		"access_token":  string(f.accessToken),
		"refresh_token": string(f.refreshToken),
		"account_id":    account,
	} {
		tokens[k], _ = json.Marshal(v) // strings and nil always marshal
	}
	var err error
	if doc["tokens"], err = json.Marshal(tokens); err != nil {
		return nil, err
	}
	doc["last_refresh"], _ = json.Marshal(f.lastRefresh.UTC().Format(time.RFC3339Nano))
	if _, ok := doc["OPENAI_API_KEY"]; !ok {
		doc["OPENAI_API_KEY"] = json.RawMessage("null") // Codex always writes the key
	}
	return json.MarshalIndent(doc, "", "  ")
}

// readDoc reads auth.json as raw JSON fields, for the commands that must work
// even when its tokens do not parse (login, logout).
func readDoc(path string) (map[string]json.RawMessage, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read auth file %s: %w", path, err)
	}
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("read auth file %s: %w", path, err)
	}
	if doc == nil { // the file says null
		doc = map[string]json.RawMessage{}
	}
	return doc, nil
}

// readAuthFile reads and parses path. Errors name the file.
func readAuthFile(path string) (*authFile, error) {
	data, err := os.ReadFile(path)
	var f *authFile
	if err == nil {
		f, err = decodeAuthFile(data)
	}
	if err != nil {
		return nil, fmt.Errorf("read auth file %s: %w", path, err)
	}
	return f, nil
}

// lockAuthFile takes the advisory lock shared with the Codex CLI (see
// lockFileName). It polls with LOCK_NB so that the wait honours ctx and is
// bounded by lockTimeout. The returned func releases the lock.
func lockAuthFile(ctx context.Context, path string) (unlock func(), err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("lock auth file: %w", err)
	}
	lf, err := os.OpenFile(filepath.Join(dir, lockFileName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock auth file: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, lockTimeout)
	defer cancel()
	for {
		err := syscall.Flock(int(lf.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { lf.Close() }, nil // closing the descriptor releases the flock
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			lf.Close()
			return nil, fmt.Errorf("lock auth file: %w", err)
		}
		if err := sleepCtx(ctx, 50*time.Millisecond); err != nil {
			lf.Close()
			return nil, fmt.Errorf("lock auth file: another process holds %s: %w", lf.Name(), err)
		}
	}
}

// sleepCtx waits for d or until ctx is done.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// tokenError is a failed answer from the OAuth server. Both error shapes are
// seen: OpenAI's nested {"error":{"message","type","code"}} and RFC 6749
// §5.2's {"error","error_description"} (codex-backend.md §1.4, §1.8).
type tokenError struct {
	status            int
	code, description string
}

// Error relays the server's code and description.
func (e *tokenError) Error() string {
	msg := fmt.Sprintf("http %d", e.status)
	if e.code != "" {
		msg += " " + e.code
	}
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

// parseTokenError reads either error shape from body.
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

// postJSON POSTs in as JSON to url and decodes a 2xx answer into out; any
// other status is a *tokenError.
func postJSON(ctx context.Context, client *http.Client, url string, in, out any) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
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
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		return parseTokenError(resp.StatusCode, data)
	}
	return json.Unmarshal(data, out)
}

// authStore gives the proxy a valid access token, refreshing it when needed
// without ever spending the shared refresh token twice: one refresh at a time
// in this process (sem), one at a time across processes (the file lock), and
// the file is re-read under the lock so a refresh by the Codex CLI is adopted
// instead of repeated.
//
// The refresh is a plain JSON POST (codex-backend.md §1.8) rather than an
// oauth2.TokenSource: the server answers with nested error bodies that
// oauth2.RetrieveError does not parse, any of the three tokens may be missing
// from the answer, and the cache that matters is the file shared with another
// process, which an in-memory TokenSource would only shadow.
type authStore struct {
	path, issuer string
	client       *http.Client
	now          func() time.Time
	sem          chan struct{} // capacity 1, held across a refresh; a channel so waiters honour ctx

	mu     sync.Mutex
	cached *authFile   // last parse of the file; never modified once cached
	stamp  os.FileInfo // the file cached was read from
}

// newAuthStore returns a store for the auth file at path, refreshing through
// issuer's token endpoint with client. now is the clock.
func newAuthStore(path, issuer string, client *http.Client, now func() time.Time) *authStore {
	return &authStore{path: path, issuer: issuer, client: client, now: now, sem: make(chan struct{}, 1)}
}

// token returns a valid access token and the ChatGPT account id. rejected, when
// non-empty, is an access token the upstream just answered 401 to: refresh,
// unless the current token already differs from it (someone else refreshed).
func (a *authStore) token(ctx context.Context, rejected string) (access secret, accountID string, err error) {
	f, err := a.load(false)
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
	_, err := a.load(false)
	return err == nil
}

// stale reports whether f's access token must be refreshed. A token without
// exp is used until the upstream rejects it.
func (a *authStore) stale(f *authFile, rejected string) bool {
	if f.accessToken == "" || rejected != "" && string(f.accessToken) == rejected {
		return true
	}
	exp := f.expires()
	return !exp.IsZero() && !a.now().Add(refreshSkew).Before(exp)
}

// load returns the parsed file. Unless force is set it re-reads only when the
// file changed on disk (replaced, resized or touched), so a refresh written by
// the Codex CLI is picked up at the cost of one stat per call.
func (a *authStore) load(force bool) (*authFile, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	// Stat before reading: a change in between only costs one more read later.
	fi, err := os.Stat(a.path)
	if err == nil && !force && a.cached != nil &&
		os.SameFile(fi, a.stamp) && fi.Size() == a.stamp.Size() && fi.ModTime().Equal(a.stamp.ModTime()) {
		return a.cached, nil
	}
	f, err := readAuthFile(a.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, &loginError{"not logged in"}
	case err != nil:
		return nil, err
	case !f.hasTokens():
		return nil, &loginError{"no ChatGPT login in " + a.path}
	}
	a.cached, a.stamp = f, fi
	return f, nil
}

// refresh runs under the file lock: re-read, and unless the token on disk is
// already fresh, spend the refresh token and write the answer back.
func (a *authStore) refresh(ctx context.Context, rejected string) (*authFile, error) {
	unlock, err := lockAuthFile(ctx, a.path)
	if err != nil {
		return nil, err
	}
	defer unlock()
	f, err := a.load(true)
	if err != nil || !a.stale(f, rejected) {
		return f, err
	}
	if f.refreshToken == "" {
		return nil, &loginError{"access token expired and " + a.path + " has no refresh token"}
	}
	// From here the refresh token is spent. If the caller gave up (a client
	// disconnect) and the answer were dropped, the rotated refresh token would
	// be lost and the user logged out, so the request and the write outlive ctx.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), refreshTimeout)
	defer cancel()
	var resp tokenFields
	req := map[string]string{"client_id": oauthClientID, "grant_type": "refresh_token", "refresh_token": string(f.refreshToken)}
	if err := postJSON(ctx, a.client, a.issuer+"/oauth/token", req, &resp); err != nil {
		var te *tokenError
		if errors.As(err, &te) && te.permanent() {
			return nil, &loginError{"refresh token no longer valid (" + te.Error() + ")"}
		}
		return nil, fmt.Errorf("refresh access token: %w", err)
	}
	nf := *f // a copy: the cached value is shared; only the tokens that came back are replaced
	nf.idToken = cmp.Or(secret(resp.IDToken), f.idToken)
	nf.accessToken = cmp.Or(secret(resp.AccessToken), f.accessToken)
	nf.refreshToken = cmp.Or(secret(resp.RefreshToken), f.refreshToken)
	nf.lastRefresh = a.now()
	if err := nf.parseClaims(); err != nil {
		return nil, fmt.Errorf("refresh access token: %w", err)
	}
	data, err := nf.encode()
	if err != nil {
		return nil, fmt.Errorf("refresh access token: %w", err)
	}
	if err := writeFileAtomic(a.path, data); err != nil {
		return nil, err
	}
	return a.load(true)
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

// oauthConfig is the Codex CLI's OAuth client. AuthStyleInParams because it is
// a public PKCE client: the default auto-detection would first try HTTP Basic
// auth with an empty secret.
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

// browser runs the authorization-code flow: a callback server on 127.0.0.1,
// the browser (or the user, pasting the redirect URL) brings the code back.
func (l *login) browser(ctx context.Context, port int) (*authFile, error) {
	ln, err := l.listen(ctx, port)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx) // stops a paste still being exchanged
	defer cancel()
	// The redirect host is "localhost": it is what the OAuth server has registered.
	cfg := l.oauthConfig(fmt.Sprintf("http://localhost:%d/auth/callback", ln.Addr().(*net.TCPAddr).Port))
	verifier := oauth2.GenerateVerifier() // fresh per attempt (RFC 7636 §4.1)
	b := make([]byte, 32)
	rand.Read(b) // never fails (crypto/rand docs)
	state := base64.RawURLEncoding.EncodeToString(b)
	authURL := cfg.AuthCodeURL(state, oauth2.S256ChallengeOption(verifier),
		oauth2.SetAuthURLParam("id_token_add_organizations", "true"),
		oauth2.SetAuthURLParam("codex_cli_simplified_flow", "true"),
		oauth2.SetAuthURLParam("originator", "codex_cli_rs"))

	result := make(chan loginResult, 1)
	report := func(f *authFile, err error) { // the first outcome ends the login; later ones are dropped
		select {
		case result <- loginResult{f, err}:
		default:
		}
	}
	finish := func(code string) (*authFile, error) { return l.finish(ctx, cfg, code, verifier) }
	mux := http.NewServeMux()
	mux.HandleFunc("GET /auth/callback", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		if subtle.ConstantTimeCompare([]byte(q.Get("state")), []byte(state)) != 1 {
			// A stale tab or a forged link: refuse it, keep waiting for the real one.
			writePage(w, http.StatusBadRequest, "State mismatch", "This link is not from the current login. Run ccproxy auth login-openai again.")
			return
		}
		var f *authFile
		code, err := authorizationCode(q)
		if err == nil {
			f, err = finish(code)
		}
		if err != nil {
			writePage(w, http.StatusBadRequest, "Login failed", err.Error())
		} else {
			writePage(w, http.StatusOK, "Logged in", "ccproxy is logged in with your ChatGPT account. You can close this tab.")
		}
		report(f, err)
	})
	mux.HandleFunc("GET /cancel", func(w http.ResponseWriter, r *http.Request) {
		writePage(w, http.StatusOK, "Login cancelled", "Another login took over.")
		report(nil, errors.New("login cancelled by another login"))
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	defer func() {
		// Shutdown, not Close, so the page of the request that ended the login is delivered.
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()

	if l.openBrowser == nil {
		fmt.Fprintf(l.stderr, "open this URL in a browser to log in:\n\n%s\n\n"+
			"if the browser cannot reach this machine, paste the URL it ends on (http://localhost:...) here\n", authURL)
		go l.readPaste(state, finish, report)
	} else {
		fmt.Fprintf(l.stderr, "opening a browser to log in; if none opens, visit:\n\n%s\n\n", authURL)
		if err := l.openBrowser(authURL); err != nil {
			fmt.Fprintf(l.stderr, "could not open a browser (%v); open the URL above yourself\n", err)
		}
	}
	select {
	case r := <-result:
		return r.f, r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// readPaste accepts the final redirect URL pasted on stdin, one line at a time
// until one carries this login's state.
func (l *login) readPaste(state string, finish func(code string) (*authFile, error), report func(*authFile, error)) {
	sc := bufio.NewScanner(l.stdin)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		u, err := url.Parse(line)
		if err != nil || !u.Query().Has("state") {
			fmt.Fprintln(l.stderr, "that is not the redirect URL; paste the whole address from the browser's address bar")
			continue
		}
		if subtle.ConstantTimeCompare([]byte(u.Query().Get("state")), []byte(state)) != 1 {
			fmt.Fprintln(l.stderr, "state mismatch: that URL is from another login attempt")
			continue
		}
		var f *authFile
		code, err := authorizationCode(u.Query())
		if err == nil {
			f, err = finish(code)
		}
		report(f, err)
		return
	}
}

// listen binds the callback port on 127.0.0.1. A busy port is usually a login
// left running elsewhere: like Codex (codex-backend.md §1.6) ask it to
// /cancel, then retry for a couple of seconds.
func (l *login) listen(ctx context.Context, port int) (net.Listener, error) {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	ln, err := net.Listen("tcp", addr)
	if err == nil || port == 0 {
		return ln, err
	}
	if req, rerr := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/cancel", nil); rerr == nil {
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

// authorizationCode takes the code out of the redirect query, or explains why
// the server sent none (codex-backend.md §1.3).
func authorizationCode(q url.Values) (string, error) {
	if e := q.Get("error"); e != "" {
		desc := q.Get("error_description")
		if e == "access_denied" && strings.Contains(desc, "missing_codex_entitlement") {
			return "", errors.New("login refused: Codex is not enabled for your workspace; ask your ChatGPT workspace admin to enable it")
		}
		return "", fmt.Errorf("login refused: %s", strings.TrimSuffix(e+": "+desc, ": "))
	}
	if q.Get("code") == "" {
		return "", errors.New("login failed: the redirect carried no authorization code")
	}
	return q.Get("code"), nil
}

// loginResult is how a login ends.
type loginResult struct {
	f   *authFile
	err error
}

// finish trades an authorization code for tokens (codex-backend.md §1.4) and
// saves them.
func (l *login) finish(ctx context.Context, cfg *oauth2.Config, code, verifier string) (*authFile, error) {
	ctx = context.WithValue(ctx, oauth2.HTTPClient, l.client)
	tok, err := cfg.Exchange(ctx, code, oauth2.VerifierOption(verifier))
	if re := (*oauth2.RetrieveError)(nil); errors.As(err, &re) {
		err = parseTokenError(re.Response.StatusCode, re.Body)
	}
	if err != nil {
		return nil, fmt.Errorf("exchange authorization code: %w", err)
	}
	idToken, _ := tok.Extra("id_token").(string)
	f := &authFile{idToken: secret(idToken), accessToken: secret(tok.AccessToken), refreshToken: secret(tok.RefreshToken), lastRefresh: l.now()}
	if err := f.parseClaims(); err != nil {
		return nil, fmt.Errorf("exchange authorization code: %w", err)
	}
	if err := l.save(ctx, f); err != nil {
		return nil, err
	}
	return f, nil
}

// save writes a fresh login into the auth file, keeping the file's other
// fields. It sets ChatGPT mode explicitly, as Codex's own login does, since an
// OPENAI_API_KEY left in the file would otherwise win (codex-backend.md §2).
func (l *login) save(ctx context.Context, f *authFile) error {
	unlock, err := lockAuthFile(ctx, l.path)
	if err != nil {
		return err
	}
	defer unlock()
	doc, err := readDoc(l.path)
	if errors.Is(err, fs.ErrNotExist) {
		doc = map[string]json.RawMessage{}
	} else if err != nil {
		return fmt.Errorf("%w (move it aside to log in)", err)
	}
	delete(doc, "tokens") // the old login's token fields go with it
	doc["OPENAI_API_KEY"] = json.RawMessage("null")
	doc["auth_mode"] = json.RawMessage(`"chatgpt"`)
	f.doc = doc
	data, err := f.encode()
	if err != nil {
		return err
	}
	return writeFileAtomic(l.path, data)
}

// device runs the device-code flow (codex-backend.md §1.1): the user enters a
// code at {issuer}/codex/device while we poll until the server hands over an
// authorization code and the PKCE verifier it made for it.
func (l *login) device(ctx context.Context) (*authFile, error) {
	var uc struct {
		DeviceAuthID string          `json:"device_auth_id"`
		UserCode     string          `json:"user_code"`
		UserCodeAlt  string          `json:"usercode"` // older servers' spelling
		Interval     json.RawMessage `json:"interval"` // seconds, as a string or a number
	}
	hint := "device code login must be enabled in ChatGPT's security settings"
	req := map[string]string{"client_id": oauthClientID}
	if err := postJSON(ctx, l.client, l.issuer+"/api/accounts/deviceauth/usercode", req, &uc); err != nil {
		return nil, fmt.Errorf("request device code: %w (%s)", err, hint)
	}
	userCode := cmp.Or(uc.UserCode, uc.UserCodeAlt)
	interval := 5 * time.Second
	if n, err := strconv.Atoi(strings.Trim(string(uc.Interval), `"`)); err == nil && n > 0 {
		interval = time.Duration(n) * time.Second
	}
	fmt.Fprintf(l.stderr, "to log in, open %s/codex/device and enter this code:\n\n    %s\n\n(%s; the code expires in 15 minutes)\n",
		l.issuer, userCode, hint)
	ctx, cancel := context.WithTimeout(ctx, deviceTimeout)
	defer cancel()
	for {
		if err := l.wait(ctx, interval); err != nil {
			return nil, fmt.Errorf("wait for device code login: %w", err)
		}
		var tok struct {
			AuthorizationCode string `json:"authorization_code"`
			CodeVerifier      string `json:"code_verifier"`
		}
		req := map[string]string{"device_auth_id": uc.DeviceAuthID, "user_code": userCode}
		err := postJSON(ctx, l.client, l.issuer+"/api/accounts/deviceauth/token", req, &tok)
		if te := (*tokenError)(nil); errors.As(err, &te) && (te.status == http.StatusForbidden || te.status == http.StatusNotFound) {
			continue // not entered yet
		}
		if err != nil {
			return nil, fmt.Errorf("wait for device code login: %w", err)
		}
		return l.finish(ctx, l.oauthConfig(l.issuer+"/deviceauth/callback"), tok.AuthorizationCode, tok.CodeVerifier)
	}
}

// writePage answers the browser with a small HTML page.
func writePage(w http.ResponseWriter, status int, title, message string) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	fmt.Fprintf(w, `<!doctype html>
<html><head><meta charset="utf-8"><title>ccproxy: %[1]s</title></head>
<body style="font-family:system-ui,sans-serif;max-width:36em;margin:4em auto"><h1>%[1]s</h1><p>%[2]s</p></body></html>
`, html.EscapeString(title), html.EscapeString(message))
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
func runAuth(ctx context.Context, args []string, getenv func(string) string, stdin io.Reader, stdout, stderr io.Writer) error {
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
	switch args[0] {
	case "login-openai":
		issuer := flags.String("auth-url", cmp.Or(getenv("CCPROXY_AUTH_URL"), defaultIssuer), "OAuth issuer")
		port := flags.Int("callback-port", defaultCallbackPort, "port of the login callback")
		noBrowser := flags.Bool("no-browser", false, "print the URL and accept a pasted redirect URL")
		device := flags.Bool("device", false, "log in with a device code")
		if ok, err := parseFlags(flags, args[1:]); !ok {
			return err
		}
		// The client only makes short token-endpoint calls; the timeout keeps a
		// hung issuer from hanging the command.
		l := &login{issuer: strings.TrimRight(*issuer, "/"), path: path, client: &http.Client{Timeout: time.Minute},
			now: time.Now, stdin: stdin, stderr: stderr, wait: sleepCtx}
		if !*noBrowser {
			l.openBrowser = openBrowser
		}
		var f *authFile
		if *device {
			f, err = l.device(ctx)
		} else {
			f, err = l.browser(ctx, *port)
		}
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "logged in as %s (plan %s), credentials saved to %s\n",
			cmp.Or(f.email(), "unknown email"), strings.ToUpper(cmp.Or(f.plan(), "unknown")), path)
		return nil
	case "status", "openai-info":
		asJSON := flags.Bool("json", false, "print JSON")
		if ok, err := parseFlags(flags, args[1:]); !ok {
			return err
		}
		return printStatus(stdout, path, time.Now(), args[0] == "openai-info", *asJSON)
	case "logout":
		yes := flags.Bool("yes", false, "do not ask for confirmation")
		if ok, err := parseFlags(flags, args[1:]); !ok {
			return err
		}
		return logout(ctx, stdin, stdout, stderr, path, *yes)
	}
	return usagef("unknown auth command %q: want login-openai, status, openai-info or logout", args[0])
}

// parseFlags parses a subcommand's flags. ok is false when the command must
// stop: after -h (err nil), or on a bad flag, already reported by flags.
func parseFlags(flags *flag.FlagSet, args []string) (ok bool, err error) {
	switch err := flags.Parse(args); {
	case errors.Is(err, flag.ErrHelp):
		return false, nil
	case err != nil:
		return false, exitStatus(2)
	case flags.NArg() > 0:
		return false, usagef("%s takes no arguments, got %q", flags.Name(), flags.Arg(0))
	}
	return true, nil
}

// authSummary is what `auth status --json` and `auth openai-info --json` print.
type authSummary struct {
	LoggedIn          bool   `json:"logged_in"`
	Email             string `json:"email,omitempty"`
	Plan              string `json:"plan,omitempty"`
	AccountID         string `json:"account_id,omitempty"`
	ExpiresAt         string `json:"expires_at,omitempty"`
	ExpiresInSeconds  int64  `json:"expires_in_seconds,omitempty"` // negative once expired
	RefreshToken      bool   `json:"refresh_token_present"`
	LastRefresh       string `json:"last_refresh,omitempty"`
	AccessTokenPrefix string `json:"access_token_prefix,omitempty"` // enough to tell two tokens apart, useless to an attacker
	Path              string `json:"path"`
}

// printStatus prints `auth status` (one line) or `auth openai-info` (details)
// from the file alone, without network. Not logged in is exit status 1.
func printStatus(w io.Writer, path string, now time.Time, detailed, asJSON bool) error {
	f, err := readAuthFile(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	s := authSummary{LoggedIn: err == nil && f.hasTokens(), Path: path}
	var valid string
	if s.LoggedIn {
		s.Email, s.Plan, s.AccountID = f.email(), f.plan(), f.account()
		s.RefreshToken = f.refreshToken != ""
		s.AccessTokenPrefix = string(f.accessToken[:min(8, len(f.accessToken))])
		if !f.lastRefresh.IsZero() {
			s.LastRefresh = f.lastRefresh.UTC().Format(time.RFC3339)
		}
		valid = "token expiry unknown"
		if exp := f.expires(); !exp.IsZero() {
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
		fmt.Fprintf(w, "not logged in: %s (%s)\n", loginHint, path)
	case detailed:
		refresh := "no"
		if s.RefreshToken {
			refresh = "yes"
		}
		fmt.Fprintf(w, "plan:           %s\naccount id:     %s\nemail:          %s\n",
			strings.ToUpper(s.Plan), s.AccountID, s.Email)
		fmt.Fprintf(w, "token expires:  %s (%s)\nauth file:      %s\nrefresh token:  %s\nlast refresh:   %s\naccess token:   %s…\n",
			cmp.Or(s.ExpiresAt, "unknown"), valid, path, refresh, cmp.Or(s.LastRefresh, "unknown"), s.AccessTokenPrefix)
	default:
		fmt.Fprintf(w, "logged in as %s (%s), %s, %s\n", cmp.Or(s.Email, "unknown email"), cmp.Or(s.Plan, "unknown plan"), valid, path)
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

// logout removes the login from the auth file, keeping its other fields, and
// deletes the file when nothing else is left. The file is shared, so it asks
// first unless yes: the Codex CLI is logged out too.
func logout(ctx context.Context, stdin io.Reader, stdout, stderr io.Writer, path string, yes bool) error {
	doc, err := readDoc(path)
	if errors.Is(err, fs.ErrNotExist) || err == nil && !hasLogin(doc) {
		fmt.Fprintln(stdout, "not logged in")
		return nil
	}
	if err != nil {
		return err
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
	if string(doc["auth_mode"]) == `"chatgpt"` {
		delete(doc, "auth_mode")
	}
	if string(doc["OPENAI_API_KEY"]) == "null" {
		delete(doc, "OPENAI_API_KEY")
	}
	if len(doc) == 0 {
		if err := os.Remove(path); err != nil {
			return fmt.Errorf("remove auth file: %w", err)
		}
	} else {
		data, err := json.MarshalIndent(doc, "", "  ")
		if err != nil {
			return err
		}
		if err := writeFileAtomic(path, data); err != nil {
			return err
		}
	}
	fmt.Fprintf(stdout, "logged out: tokens removed from %s\n", path)
	return nil
}

// hasLogin reports whether doc holds tokens in either layout.
func hasLogin(doc map[string]json.RawMessage) bool {
	for _, k := range []string{"tokens", "access_token", "refresh_token"} {
		if v, ok := doc[k]; ok && string(v) != "null" {
			return true
		}
	}
	return false
}
