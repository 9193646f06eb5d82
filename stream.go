package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"mime"
	"net/http"
	"net/http/cookiejar"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// maxEventBytes bounds one upstream SSE event; output items can carry whole images as base64.
const maxEventBytes = 32 << 20

var errEventTooLarge = errors.New("upstream event exceeds 32 MiB")

// sseReader parses a text/event-stream body as the WHATWG HTML standard defines it: "event:" and
// "data:" fields, multi-line data joined with "\n", ":" comments, a blank line ending each event.
type sseReader struct {
	r       *bufio.Reader
	name    []byte
	data    []byte
	long    []byte // reassembles lines longer than the bufio buffer
	pending []byte // rest of the current physical line after a lone CR
}

// newSSEReader keeps bufio's 4 KiB default: a thousand open streams should not pin 64 MiB.
func newSSEReader(r io.Reader) *sseReader {
	return &sseReader{r: bufio.NewReader(r)}
}

// next returns the next event, valid until the following call. A stream that stops inside an
// event ends with io.ErrUnexpectedEOF, not io.EOF.
func (s *sseReader) next() (name, data []byte, err error) {
	s.name, s.data = s.name[:0], s.data[:0]
	hasData := false
	for {
		line, err := s.line()
		if err != nil {
			if errors.Is(err, io.EOF) && (hasData || len(s.name) > 0) {
				err = io.ErrUnexpectedEOF
			}
			return nil, nil, err
		}
		if len(line) == 0 {
			if hasData {
				return s.name, s.data, nil
			}
			s.name = s.name[:0] // an event without data is not dispatched
			continue
		}
		field, value, _ := bytes.Cut(line, []byte(":"))
		value = bytes.TrimPrefix(value, []byte(" "))
		switch string(field) {
		case "event":
			s.name = append(s.name[:0], value...)
		case "data":
			if hasData {
				s.data = append(s.data, '\n')
			}
			if len(s.data)+len(value) > maxEventBytes {
				return nil, nil, errEventTooLarge
			}
			s.data = append(s.data, value...)
			hasData = true
		}
		// "" is a comment; "id" and "retry" mean nothing to a proxy.
	}
}

// line returns the next line without its terminator. CR, LF and CRLF all end a line, so a stray
// CR cannot smuggle a line break into an event name or data relayed to the client.
func (s *sseReader) line() ([]byte, error) {
	if len(s.pending) == 0 {
		line, err := s.r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			s.long = append(s.long[:0], line...)
			for errors.Is(err, bufio.ErrBufferFull) {
				line, err = s.r.ReadSlice('\n')
				if len(s.long)+len(line) > maxEventBytes+64 {
					return nil, errEventTooLarge
				}
				s.long = append(s.long, line...)
			}
			line = s.long
		}
		if err != nil {
			if errors.Is(err, io.EOF) && len(line) > 0 {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
		s.pending = line // ends in '\n'; stays valid until the next read
	}
	line := s.pending
	i := bytes.IndexAny(line, "\r\n")
	end := i + 1
	if line[i] == '\r' && end < len(line) && line[end] == '\n' {
		end++
	}
	s.pending = line[end:]
	return line[:i], nil
}

// buffered reports whether more upstream bytes have arrived: their events can share one flush.
func (s *sseReader) buffered() bool { return len(s.pending) > 0 || s.r.Buffered() > 0 }

// sseWriter writes whole events to the client. The headers go out with the first event, so a
// request that fails before it still gets a proper HTTP error. From the first flush on, each
// interval of silence earns a keepalive, so that clients wait through long reasoning.
type sseWriter struct {
	mu       sync.Mutex
	w        http.ResponseWriter
	rc       *http.ResponseController
	buf      []byte
	err      error  // the first write error: the client is gone
	started  bool   // the status and headers are sent
	done     bool   // close was called: no more keepalives
	ping     []byte // what a keepalive writes
	interval time.Duration
	idle     *time.Timer
}

func newSSEWriter(w http.ResponseWriter, interval time.Duration) *sseWriter {
	return &sseWriter{w: w, rc: http.NewResponseController(w), interval: interval,
		ping: []byte(": keepalive\n\n")}
}

func (s *sseWriter) keepalive() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.done && s.err == nil {
		s.writeLocked(s.ping)
		s.flushLocked()
	}
}

// event writes one event; name may be empty. Each line of data gets a data field of its own.
func (s *sseWriter) event(name string, data []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.buf[:0]
	if name != "" {
		b = append(append(append(b, "event: "...), name...), '\n')
	}
	for line := range bytes.SplitSeq(data, []byte("\n")) {
		b = append(append(append(b, "data: "...), line...), '\n')
	}
	s.buf = append(b, '\n')
	s.writeLocked(s.buf)
}

// flush sends what has been written and restarts the keepalive clock.
func (s *sseWriter) flush() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started {
		s.flushLocked()
	}
	if s.idle == nil && !s.done {
		s.idle = time.AfterFunc(s.interval, s.keepalive)
	}
}

func (s *sseWriter) writeLocked(b []byte) {
	if !s.started {
		h := s.w.Header()
		h.Set("Content-Type", "text/event-stream")
		h.Set("Cache-Control", "no-cache")
		h.Set("X-Accel-Buffering", "no") // keeps reverse proxies such as nginx from buffering
		s.w.WriteHeader(http.StatusOK)
		s.started = true
	}
	if s.err == nil {
		_, s.err = s.w.Write(b)
	}
}

func (s *sseWriter) flushLocked() {
	if s.err == nil {
		s.err = s.rc.Flush()
	}
	if s.idle != nil {
		s.idle.Reset(s.interval)
	}
}

// close stops the keepalives and reports whether the response had begun.
func (s *sseWriter) close() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.done = true
	if s.idle != nil {
		s.idle.Stop()
	}
	return s.started
}

// tokenSource supplies the bearer and the account id; rejected is a token the backend refused.
type tokenSource interface {
	token(ctx context.Context, rejected string) (secret, string, error)
}

// The Codex CLI whose requests ccproxy reproduces (codex-rs/login/src/auth/default_client.rs).
// The backend uses them for analytics and routing; it is not known to validate them.
const (
	codexVersion    = "0.169.0"
	codexOriginator = "codex_cli_rs"
	codexUserAgent  = codexOriginator + "/" + codexVersion + " (" + runtime.GOOS + "; " + runtime.GOARCH +
		") ccproxy"
)

type upstream struct {
	base    string
	auth    tokenSource
	client  *http.Client
	now     func() time.Time
	retries int                         // extra attempts after 5xx or transport errors
	backoff time.Duration               // first retry delay, doubled each time
	usage   atomic.Pointer[http.Header] // latest x-codex-* headers, for GET /codex/usage
}

// newUpstream retries less than the Codex CLI, which makes 4 retries from 200 ms
// (codex-rs/core/src/model_provider_info.rs): an interactive proxy gives up a little sooner.
func newUpstream(base string, auth tokenSource, client *http.Client) *upstream {
	return &upstream{base: base, auth: auth, client: client, now: time.Now, retries: 3,
		backoff: 200 * time.Millisecond}
}

// newUpstreamClient has no Client.Timeout, which "includes … reading the response body". Like the
// Codex CLI, it keeps the cookies chatgpt.com sets, Cloudflare's among them.
func newUpstreamClient() *http.Client {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.ResponseHeaderTimeout = 2 * time.Minute
	t.MaxIdleConnsPerHost = 64
	jar, _ := cookiejar.New(nil) // cannot fail without options
	return &http.Client{Transport: t, Jar: jar}
}

// challenge reports a Cloudflare challenge page in place of the backend (openai/codex#17860).
func challenge(resp *http.Response) bool {
	ct, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	return resp.Header.Get("Cf-Mitigated") == "challenge" ||
		resp.StatusCode == http.StatusForbidden && ct == "text/html"
}

func (u *upstream) send(ctx context.Context, req *request) (*http.Response, error) {
	return u.do(ctx, http.MethodPost, u.base+"/responses", req.body, req.header)
}

// errUnreachable marks a transport failure, which do retries.
var errUnreachable = errors.New("could not reach the Codex backend")

// do returns a 2xx or 304 response. It retries a 401 once with a refreshed token, a Cloudflare
// challenge once with the cookies it set, and 5xx and transport errors with backoff (or
// Retry-After). Other failures are an *upstreamError.
func (u *upstream) do(ctx context.Context, method, url string, body []byte,
	h http.Header) (*http.Response, error) {
	rejected, challenged := "", false
	for attempt := 0; ; attempt++ {
		resp, tok, err := u.try(ctx, method, url, body, h, rejected)
		var delay time.Duration
		switch {
		case err != nil && (ctx.Err() != nil || !errors.Is(err, errUnreachable)):
			return nil, err
		case err != nil && attempt < u.retries:
			delay = u.backoff << attempt
		case err != nil:
			return nil, fmt.Errorf("after %d attempts: %w", attempt+1, err)
		case resp.StatusCode < 300 || resp.StatusCode == http.StatusNotModified:
			u.remember(resp.Header)
			return resp, nil
		case resp.StatusCode == http.StatusUnauthorized && rejected == "":
			drain(resp)
			rejected, attempt = string(tok), attempt-1
			continue
		case challenge(resp) && !challenged:
			drain(resp)
			challenged, attempt = true, attempt-1
			continue
		case resp.StatusCode >= 500 && attempt < u.retries:
			delay = u.backoff << attempt
			drain(resp)
			if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && s >= 0 {
				if delay = time.Duration(s) * time.Second; delay > 30*time.Second {
					return nil, &apiError{kind: errBackend, code: "upstream_unavailable", msg: fmt.Sprintf(
						"the Codex backend is unavailable (HTTP %d) and asks to retry in %s",
						resp.StatusCode, delay)}
				}
			}
		default:
			u.remember(resp.Header)
			return nil, u.refusal(resp)
		}
		if err := sleepCtx(ctx, delay); err != nil {
			return nil, err
		}
	}
}

// try makes one attempt with the current token, returned so that a 401 can name it.
func (u *upstream) try(ctx context.Context, method, url string, body []byte, h http.Header,
	rejected string) (*http.Response, secret, error) {
	tok, account, err := u.auth.token(ctx, rejected)
	if err != nil && !errors.Is(err, errLoginRequired) && ctx.Err() == nil {
		err = &apiError{kind: errBackend, code: "token_refresh_failed", cause: err, msg: "could not " +
			"refresh the ChatGPT token (" + err.Error() + "); try again, or run `ccproxy auth login-openai`"}
	}
	if err != nil {
		return nil, "", err
	}
	req, err := http.NewRequestWithContext(ctx, method, url, bytes.NewReader(body))
	if err != nil {
		return nil, "", err
	}
	maps.Copy(req.Header, h)
	req.Header.Set("Authorization", "Bearer "+string(tok))
	req.Header.Set("Chatgpt-Account-Id", account)
	req.Header.Set("Originator", codexOriginator)
	req.Header.Set("Version", codexVersion)
	req.Header.Set("User-Agent", codexUserAgent)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := u.client.Do(req)
	if err != nil && ctx.Err() == nil {
		err = &apiError{kind: errBackend, code: "upstream_unreachable", cause: errUnreachable,
			msg: "could not reach the Codex backend: " + err.Error()}
	}
	return resp, tok, err
}

// drain discards a small body so the connection can be reused, and closes it.
func drain(resp *http.Response) {
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
}

func (u *upstream) remember(h http.Header) {
	if c := codexHeaders(h); len(c) > 0 {
		u.usage.Store(&c)
	}
}

type usageWindow struct {
	UsedPercent   float64 `json:"used_percent"`
	WindowMinutes float64 `json:"window_minutes"`
	ResetsAt      float64 `json:"resets_at,omitempty"`
	ResetsIn      float64 `json:"resets_in_seconds,omitempty"`
}

// usageReport is GET /codex/usage and `ccproxy usage --json`.
type usageReport struct {
	Available   bool            `json:"available"`
	Plan        string          `json:"plan,omitempty"`
	ActiveLimit string          `json:"active_limit,omitempty"`
	Primary     *usageWindow    `json:"primary,omitempty"`
	Secondary   *usageWindow    `json:"secondary,omitempty"`
	Credits     json.RawMessage `json:"credits,omitempty"`
}

// report reads the x-codex-* headers of the latest answer or, before one, the usage endpoint the
// Codex CLI reads (codex-rs/backend-client). The 5-hour window may be missing for some plans.
func (u *upstream) report(ctx context.Context) (usageReport, error) {
	if h := u.usage.Load(); h != nil {
		return headerReport(*h), nil
	}
	url := strings.TrimSuffix(u.base, "/codex") + "/wham/usage"
	resp, err := u.do(ctx, http.MethodGet, url, nil, http.Header{"Accept": {"application/json"}})
	if err != nil {
		return usageReport{}, err
	}
	defer resp.Body.Close()
	type window struct {
		UsedPercent float64 `json:"used_percent"`
		Seconds     float64 `json:"limit_window_seconds"`
		ResetsAfter float64 `json:"reset_after_seconds"`
		ResetsAt    float64 `json:"reset_at"`
	}
	var w struct {
		Plan      string `json:"plan_type"`
		RateLimit struct {
			Primary   *window `json:"primary_window"`
			Secondary *window `json:"secondary_window"`
		} `json:"rate_limit"`
		Credits json.RawMessage `json:"credits"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&w); err != nil {
		return usageReport{}, fmt.Errorf("read the usage endpoint's answer: %w", err)
	}
	convert := func(w *window) *usageWindow {
		if w == nil {
			return nil
		}
		return &usageWindow{w.UsedPercent, w.Seconds / 60, w.ResetsAt, w.ResetsAfter}
	}
	return usageReport{Available: true, Plan: w.Plan, Credits: w.Credits,
		Primary: convert(w.RateLimit.Primary), Secondary: convert(w.RateLimit.Secondary)}, nil
}

// headerReport reads the x-codex-* headers (codex-rs/codex-api/src/rate_limits.rs): a window is
// there when its used percent or its length is.
func headerReport(h http.Header) usageReport {
	num := func(name string) float64 {
		f, _ := strconv.ParseFloat(h.Get("X-Codex-"+name), 64)
		return f
	}
	window := func(p string) *usageWindow {
		if h.Get("X-Codex-"+p+"-Used-Percent") == "" && h.Get("X-Codex-"+p+"-Window-Minutes") == "" {
			return nil
		}
		return &usageWindow{num(p + "-Used-Percent"), num(p + "-Window-Minutes"), num(p + "-Reset-At"),
			num(p + "-Reset-After-Seconds")}
	}
	credits := map[string]any{} // "True"/"False" flags and a balance, which may be "0"
	for _, k := range []string{"Has-Credits", "Unlimited"} {
		if b, err := strconv.ParseBool(h.Get("X-Codex-Credits-" + k)); err == nil {
			credits[strings.ReplaceAll(strings.ToLower(k), "-", "_")] = b
		}
	}
	if f, err := strconv.ParseFloat(h.Get("X-Codex-Credits-Balance"), 64); err == nil {
		credits["balance"] = f
	}
	return usageReport{Available: true, Plan: h.Get("X-Codex-Plan-Type"),
		ActiveLimit: h.Get("X-Codex-Active-Limit"), Credits: marshal(credits),
		Primary: window("Primary"), Secondary: window("Secondary")}
}

// codexHeaders returns the x-codex-* headers: the rate-limit snapshot sent with every answer.
func codexHeaders(h http.Header) http.Header {
	c := http.Header{}
	for k, v := range h {
		if strings.HasPrefix(k, "X-Codex-") {
			c[k] = v
		}
	}
	return c
}

// upstreamError is an error answer of the backend, relayed to the client.
type upstreamError struct {
	status           int
	typ, code, param string
	msg              string
	header           http.Header // Retry-After and the x-codex-* headers
}

func (e *upstreamError) Error() string { return e.msg }

// refusal reads a backend error answer. Bodies come as {"detail":"…"} (gateway validation) or
// {"error":{…}} (model and usage errors); an HTML page is Cloudflare's.
func (u *upstream) refusal(resp *http.Response) error {
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if challenge(resp) || bytes.Contains(b, []byte("<html")) || bytes.Contains(b, []byte("<!DOCTYPE")) {
		return &apiError{kind: errBackend, code: "cloudflare_challenge", msg: fmt.Sprintf("Cloudflare, "+
			"in front of chatgpt.com, answered HTTP %d with a challenge page instead of the Codex backend: "+
			"it distrusts this network or client; try again later, from another network, or through a "+
			"proxy (HTTPS_PROXY)", resp.StatusCode)}
	}
	var body struct {
		Detail any `json:"detail"`
		Error  struct {
			Message, Type, Param string
			Code                 any
			PlanType             string `json:"plan_type"`
			ResetsAt             int64  `json:"resets_at"`
			ResetsInSeconds      int64  `json:"resets_in_seconds"`
		} `json:"error"`
	}
	json.Unmarshal(b, &body)
	e := body.Error
	code, _ := e.Code.(string)
	out := &upstreamError{status: resp.StatusCode, typ: e.Type, code: code, param: e.Param, msg: e.Message,
		header: codexHeaders(resp.Header)}
	if out.msg == "" && body.Detail != nil {
		out.msg = fmt.Sprint(body.Detail)
	}
	if out.msg == "" {
		out.msg = strings.TrimSpace(string(b[:min(len(b), 200)]))
	}
	if ra := resp.Header.Get("Retry-After"); ra != "" {
		out.header.Set("Retry-After", ra)
	}
	if strings.HasPrefix(e.Type, "usage_") { // usage_limit_reached, usage_not_included: codes, not types
		out.typ, out.code = "", cmp.Or(code, e.Type)
	}
	switch {
	case resp.StatusCode == http.StatusTooManyRequests && out.code == "usage_limit_reached":
		// The 2026 body has resets_at; 2025 bodies had resets_in_seconds.
		wait := e.ResetsInSeconds
		if wait <= 0 && e.ResetsAt > 0 {
			wait = e.ResetsAt - u.now().Unix()
		}
		out.msg = fmt.Sprintf("ChatGPT usage limit reached (plan %s)", cmp.Or(e.PlanType, "unknown"))
		if d := time.Duration(wait) * time.Second; wait > 0 {
			out.header.Set("Retry-After", strconv.FormatInt(wait, 10))
			out.msg += fmt.Sprintf("; it resets at %s (in %s)", u.now().Add(d).UTC().Format(time.RFC3339), d)
		}
	case resp.StatusCode == http.StatusTooManyRequests:
		out.msg = "the Codex backend is rate limiting: " + out.msg
	case resp.StatusCode == http.StatusUnauthorized:
		out.msg = "the Codex backend rejected the credentials even after a refresh (" + out.msg +
			"): run `ccproxy auth login-openai`"
	case resp.StatusCode >= 500:
		out.msg = fmt.Sprintf("the Codex backend failed (HTTP %d): %s", resp.StatusCode, out.msg)
	}
	return out
}

// readTurn reads one backend stream into t and out, flushing whenever no upstream bytes wait. It
// returns at the terminal event or failure. Events before the output are held back, so that a
// failure before it (overload is reported inside the stream, openai/codex#43337) reaches the
// client as an HTTP error, or not at all when a retry succeeds.
func readTurn(body io.Reader, t *turn, out renderer) error {
	rd := newSSEReader(body)
	var ev event
	var held []event // the preamble, until the first output: then the turn cannot be retried
	out.flush()      // the backend's stream is open: silence from now on earns keepalives
	for {
		name, data, err := rd.next()
		if errors.Is(err, context.Canceled) { // the client left
			return err
		}
		if errors.Is(err, io.EOF) {
			err = errors.New("stream closed before response.completed")
		}
		if err != nil {
			return &apiError{kind: errBackend, code: "upstream_stream_error", cause: err,
				msg: "the Codex backend stream broke: " + err.Error()}
		}
		ev.decode(name, data)
		t.add(&ev, out.piece)
		switch ev.typ {
		case "response.created", "response.in_progress", "response.metadata":
			if !t.began {
				held = append(held, event{typ: ev.typ, data: bytes.Clone(ev.data)})
				continue
			}
		case "error", "response.failed":
			if !t.began {
				return t.err
			}
		}
		t.began = true
		for i := range held {
			out.event(&held[i])
		}
		held = nil
		out.event(&ev)
		if t.err != nil || t.done {
			return t.err
		}
		if !rd.buffered() {
			out.flush()
		}
	}
}

// catalogModel is what ccproxy reads of a backend catalog entry (GET {upstream}/models).
type catalogModel struct {
	Slug             string         `json:"slug"`
	Visibility       string         `json:"visibility,omitempty"`
	Lite             bool           `json:"use_responses_lite,omitempty"`
	Summary          *bool          `json:"supports_reasoning_summary_parameter,omitempty"`
	Modalities       []string       `json:"input_modalities"`
	Efforts          []catalogLevel `json:"supported_reasoning_levels"`
	Tiers            []catalogTier  `json:"service_tiers"`
	BaseInstructions string         `json:"base_instructions,omitempty"`
	Messages         struct {
		Template string `json:"instructions_template,omitempty"`
	} `json:"model_messages"`
}

type catalogLevel struct {
	Effort string `json:"effort"`
}

type catalogTier struct {
	ID string `json:"id"`
}

// efforts lists the model's reasoning efforts; nil when the catalog does not say.
func (m *catalogModel) efforts() []string {
	var es []string
	for _, e := range m.Efforts {
		es = append(es, e.Effort)
	}
	return es
}

// tiers lists the model's service tiers; nil when the catalog does not say.
func (m *catalogModel) tiers() []string {
	if m.Tiers == nil {
		return nil
	}
	ts := []string{}
	for _, t := range m.Tiers {
		ts = append(ts, t.ID)
	}
	return ts
}

// fallbackModels, used until the backend's catalog is fetched, is the Codex CLI 0.169.0's, plus
// gpt-5.3-codex-spark (text only, no reasoning.summary, openai/codex#34247).
var fallbackModels = func() []catalogModel {
	const max, ultra = "low medium high xhigh max", "low medium high xhigh max ultra"
	var ms []catalogModel
	for _, e := range []struct {
		slug, efforts, visibility string
		lite, priority            bool
	}{
		{"gpt-6.1-sol", ultra, "list", true, true},
		{"gpt-6-astra", ultra, "list", true, true},
		{"gpt-6-sol", ultra, "list", true, true},
		{"gpt-6-luna", max, "list", true, true},
		{"gpt-5.6-sol", ultra, "list", true, true},
		{"gpt-6.1-terra", ultra, "list", true, true},
		{"gpt-5.6-terra", ultra, "list", true, true},
		{"gpt-5.6-luna", max, "list", true, true},
		{"gpt-daybreak-blue-latest", ultra, "hide", true, false},
		{"gpt-daybreak-red-latest", ultra, "hide", true, false},
		{"gpt-5.5", "low medium high xhigh", "list", false, true},
		{"codex-auto-review", max, "hide", true, true},
	} {
		m := catalogModel{Slug: e.slug, Visibility: e.visibility, Lite: e.lite, Tiers: []catalogTier{},
			Modalities: []string{"text", "image"}}
		for _, effort := range strings.Fields(e.efforts) {
			m.Efforts = append(m.Efforts, catalogLevel{effort})
		}
		if e.priority {
			m.Tiers = append(m.Tiers, catalogTier{"priority"})
		}
		ms = append(ms, m)
	}
	return append(ms, catalogModel{Slug: "gpt-5.3-codex-spark", Visibility: "list", Summary: new(bool),
		Modalities: []string{"text"}})
}()

// catalog is the backend's model list, GET {upstream}/models, cached in memory for an hour and on
// disk (models.json) with its ETag. A failed fetch is tried again after a minute.
type catalog struct {
	up     *upstream
	path   string
	now    func() time.Time
	mu     sync.Mutex
	etag   string
	models []catalogModel // nil until models.json or the backend had some
	next   time.Time      // when to ask the backend again
}

func newCatalog(up *upstream, path string, now func() time.Time) *catalog {
	c := &catalog{up: up, path: path, now: now}
	var cc cachedCatalog
	if b, err := os.ReadFile(path); err == nil && json.Unmarshal(b, &cc) == nil {
		c.etag, c.models = cc.ETag, cc.Models
	}
	return c
}

// cachedCatalog is the models.json layout.
type cachedCatalog struct {
	ETag   string         `json:"etag"`
	Models []catalogModel `json:"models"`
}

// list returns the models, refreshing the cache when it is due. Without any catalog it returns
// the built-in one and the fetch error.
func (c *catalog) list(ctx context.Context) ([]catalogModel, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var err error
	if now := c.now(); !now.Before(c.next) {
		c.next = now.Add(time.Minute)
		if err = c.fetch(ctx); err == nil {
			c.next = now.Add(time.Hour)
		}
	}
	if c.models == nil {
		return fallbackModels, err
	}
	return c.models, nil
}

// find returns the model's catalog entry, or nil. It asks the backend only for a model it does
// not know yet (one newer than the built-in catalog): the rest is no reason to delay a turn.
func (c *catalog) find(ctx context.Context, slug string) *catalogModel {
	c.mu.Lock()
	models := c.models
	c.mu.Unlock()
	if models == nil {
		models = fallbackModels
	}
	is := func(m catalogModel) bool { return m.Slug == slug }
	i := slices.IndexFunc(models, is)
	if i < 0 {
		models, _ = c.list(ctx)
		i = slices.IndexFunc(models, is)
	}
	if i < 0 {
		return nil
	}
	return &models[i]
}

func (c *catalog) fetch(ctx context.Context) error {
	h := http.Header{"Accept": {"application/json"}}
	if c.etag != "" && c.models != nil {
		h.Set("If-None-Match", c.etag)
	}
	resp, err := c.up.do(ctx, http.MethodGet, c.up.base+"/models?client_version="+codexVersion, nil, h)
	if err != nil {
		return fmt.Errorf("fetch model catalog: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotModified {
		return nil
	}
	var cc cachedCatalog
	err = json.NewDecoder(io.LimitReader(resp.Body, 16<<20)).Decode(&cc)
	if err != nil || len(cc.Models) == 0 {
		return fmt.Errorf("fetch model catalog: unexpected reply (%v)", err)
	}
	cc.ETag = resp.Header.Get("Etag")
	c.etag, c.models = cc.ETag, cc.Models
	return writeFileAtomic(c.path, marshal(cc))
}

// instructions returns the model's prompt from the catalog: base_instructions, empty for every
// model since 2026, else model_messages.instructions_template.
func (c *catalog) instructions(ctx context.Context, model string) (string, error) {
	models, err := c.list(ctx)
	for _, m := range models {
		if text := cmp.Or(m.BaseInstructions, m.Messages.Template); m.Slug == model && text != "" {
			return text, nil
		}
	}
	return "", &apiError{kind: errBackend, code: "instructions_unavailable", msg: fmt.Sprintf("the "+
		"backend wants instructions for %q but the model catalog has none for it (%v); use "+
		"--instructions file:PATH", model, err)}
}
