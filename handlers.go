package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

const (
	maxBodyBytes      = 32 << 20         // request bodies: images arrive inline as base64
	keepaliveInterval = 15 * time.Second // SSE comments during upstream silence
)

// errKind is a kind of failure, whichever layer finds it: the one table of HTTP statuses and
// OpenAI error types.
type errKind struct {
	status int
	typ    string
}

var (
	errInvalid      = &errKind{400, "invalid_request_error"}
	errUnauthorized = &errKind{401, "authentication_error"}
	errForbidden    = &errKind{403, "invalid_request_error"}
	errNotFound     = &errKind{404, "invalid_request_error"}
	errMethod       = &errKind{405, "invalid_request_error"}
	errTimeout      = &errKind{408, "invalid_request_error"}
	errConflict     = &errKind{409, "invalid_request_error"}
	errTooLarge     = &errKind{413, "invalid_request_error"}
	errLimited      = &errKind{429, "rate_limit_error"}
	errStorage      = &errKind{500, "api_error"}
	errBackend      = &errKind{502, "api_error"}
	errUnavailable  = &errKind{503, "api_error"}
)

// apiError is a failure the client is told about, in the OpenAI error shape.
type apiError struct {
	kind             *errKind
	code, param, msg string
	header           http.Header // extra response headers such as Retry-After
	cause            error
}

func (e *apiError) Error() string { return e.msg }
func (e *apiError) Unwrap() error { return e.cause }

// describe maps any error to what the client sees. The message is always err.Error(), so what
// wrapping adds (a hint, a second failure) is kept.
func describe(err error) (k errKind, code, param string, header http.Header) {
	var ue *upstreamError
	var ae *apiError
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &ue): // the backend's answer, relayed
		k = errKind{ue.status, cmp.Or(ue.typ, "invalid_request_error")}
		switch {
		case ue.status == http.StatusTooManyRequests:
			k.typ = "rate_limit_error"
		case ue.status == http.StatusUnauthorized:
			k.typ = "authentication_error"
		case ue.status >= 500:
			k = *errBackend
		}
		return k, ue.code, ue.param, ue.header
	case errors.As(err, &ae):
		return *ae.kind, ae.code, ae.param, ae.header
	case errors.As(err, &tooBig):
		return *errTooLarge, "request_too_large", "", nil
	case errors.Is(err, errLoginRequired):
		return *errUnauthorized, "login_required", "", nil
	case errors.Is(err, context.DeadlineExceeded):
		return errKind{504, "api_error"}, "timeout", "", nil
	}
	return errKind{500, "api_error"}, "internal_error", "", nil
}

// anthropicTypes are the Anthropic error types by status; any other is api_error. An overload
// keeps its 503: ccproxy never invents Anthropic's 529.
var anthropicTypes = map[int]string{
	400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
	404: "not_found_error", 408: "invalid_request_error", 413: "request_too_large",
	429: "rate_limit_error", 503: "overloaded_error",
}

// errorBody is Anthropic's error shape, or OpenAI's (code and param null when empty).
func errorBody(anthropic bool, err error) map[string]any {
	k, code, param, _ := describe(err)
	if anthropic {
		return map[string]any{"type": "error", "error": map[string]any{"message": err.Error(),
			"type": cmp.Or(anthropicTypes[k.status], "api_error")}}
	}
	e := map[string]any{"message": err.Error(), "type": k.typ, "param": nil, "code": nil}
	for key, v := range map[string]string{"param": param, "code": code} {
		if v != "" {
			e[key] = v
		}
	}
	return map[string]any{"error": e}
}

// errorEvent is the last event of a stream that failed after it began; no clean end follows it.
func errorEvent(api int, err error) (string, []byte) {
	body := errorBody(api == apiMessages, err)
	switch api {
	case apiChat:
		return "", marshal(body)
	case apiResponses: // the Responses stream's error event, with the error object beside it
		e := body["error"].(map[string]any)
		body = map[string]any{"type": "error", "code": e["code"], "message": e["message"], "error": e}
	}
	return "error", marshal(body)
}

// writeError is the one place errors become responses. A client that went away gets nothing.
func writeError(w http.ResponseWriter, r *http.Request, err error) {
	if clientGone(r, err) {
		return
	}
	k, _, _, header := describe(err)
	if ri := info(r); !ri.bodyRead && r.ContentLength != 0 {
		// Answered before its body was read (a wrong Host or key, an unknown route, a body too
		// large or too slow): close the connection at once rather than wait for the body.
		w.Header().Set("Connection", "close")
		http.NewResponseController(w).SetReadDeadline(time.Now())
	}
	info(r).err = err.Error()
	maps.Copy(w.Header(), header)
	if k.status < 500 && k.status != 408 && k.status != 409 && k.status != 429 {
		// The OpenAI and Anthropic SDKs honour it; Claude Code otherwise retries a 401 for minutes.
		w.Header().Set("X-Should-Retry", "false")
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(k.status)
	w.Write(marshal(errorBody(strings.Contains(r.URL.Path, "/messages"), err)))
}

// clientGone reports whether err comes from the client going away, and notes it. A body that
// stopped arriving ends the request's context too, but is answered (408).
func clientGone(r *http.Request, err error) bool {
	gone := r.Context().Err() != nil || errors.Is(err, context.Canceled)
	if !gone || errors.Is(err, os.ErrDeadlineExceeded) {
		return false
	}
	ri := info(r)
	ri.logger.Debug("client canceled", "err", err)
	ri.canceled = true
	return true
}

// handlerFunc is a handler that returns its error, which ServeHTTP answers.
type handlerFunc func(w http.ResponseWriter, r *http.Request) error

func (f handlerFunc) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if err := f(w, r); err != nil {
		writeError(w, r, err)
	}
}

// newServer is the whole API surface, behind the middleware that every request passes.
func newServer(logger *slog.Logger, cfg config, auth *authStore, sessions *sessionStore, up *upstream,
	models *catalog) http.Handler {
	mux := http.NewServeMux()
	handle := func(pattern string, h http.Handler) {
		if !cfg.codexEnabled && strings.Contains(pattern, " /codex") {
			h = handlerFunc(func(http.ResponseWriter, *http.Request) error {
				return &apiError{kind: errUnavailable, code: "codex_disabled", msg: "the /codex routes are " +
					"disabled: run `ccproxy config codex --enable` and restart `ccproxy serve`"}
			})
		}
		mux.Handle(pattern, h)
	}
	p := &prompts{instructions: cfg.instructions, models: models}
	b := &bodies{max: cfg.maxInflight, idle: cfg.bodyTimeout}
	turn := handleTurn(sessions, up, p, b, cfg)
	for _, path := range []string{"/codex", "/codex/v1", "/codex/{session_id}"} {
		handle("POST "+path+"/chat/completions", turn)
		handle("POST "+path+"/responses", turn)
		handle("POST "+path+"/messages", turn)
	}
	for _, path := range []string{"/codex", "/codex/v1"} {
		handle("POST "+path+"/images/generations", handleImages(up, p, b, cfg.imageModel))
		handle("POST "+path+"/messages/count_tokens", handleCountTokens(b, cfg.claude))
		handle("GET "+path+"/models", handleModels(models))
		handle("GET "+path+"/responses/{id}", handleStored(sessions))
		handle("GET "+path+"/responses/{id}/input_items", handleStored(sessions))
		handle("DELETE "+path+"/responses/{id}", handleStored(sessions))
	}
	handle("GET /codex/sessions", handleSessions(sessions))
	handle("GET /codex/sessions/{id}", handleSessions(sessions))
	handle("DELETE /codex/sessions/{id}", handleSessions(sessions))
	handle("GET /codex/usage", handleUsage(up))
	handle("GET /health", handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		return writeJSON(w, map[string]any{"status": "ok", "logged_in": auth.loggedIn()})
	}))
	return logRequests(logger, front(cfg.apiKey, cfg.host, mux))
}

// reqInfo is what the request's log line reports; handlers fill it in.
type reqInfo struct {
	id       string
	logger   *slog.Logger
	model    string
	stream   bool
	bodyRead bool   // the request body was read whole
	err      string // what the client was told went wrong
	canceled bool   // the client went away before the answer was complete
}

type reqKey struct{}

// info returns the request's log record, which logRequests gives every request.
func info(r *http.Request) *reqInfo { return r.Context().Value(reqKey{}).(*reqInfo) }

// logRequests gives each request an id, echoed as X-Request-Id, "used to correlate
// user-visible errors with server logs" (tailscale tsweb), and logs one line when it ends.
func logRequests(logger *slog.Logger, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		var b [8]byte
		rand.Read(b[:])
		ri := &reqInfo{id: hex.EncodeToString(b[:])}
		ri.logger = logger.With("req", ri.id)
		w.Header().Set("X-Request-Id", ri.id)
		sw := &statusWriter{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(sw, r.WithContext(context.WithValue(r.Context(), reqKey{}, ri)))
		attrs := []slog.Attr{slog.String("method", r.Method), slog.String("path", r.URL.Path),
			slog.Int("status", sw.status), slog.Int64("bytes", sw.bytes),
			slog.Duration("duration", time.Since(start)), slog.String("model", ri.model),
			slog.Bool("stream", ri.stream), slog.Bool("client_gone", ri.canceled)}
		level := slog.LevelInfo
		if ri.err != "" {
			level = slog.LevelWarn
			attrs = append(attrs, slog.String("err", ri.err))
		}
		if sw.status >= 500 {
			level = slog.LevelError
		}
		ri.logger.LogAttrs(r.Context(), level, "request", attrs...)
	})
}

// statusWriter records the status and size for the log line. Unwrap lets
// http.ResponseController reach the connection to flush streams.
type statusWriter struct {
	http.ResponseWriter
	status int
	bytes  int64
}

func (w *statusWriter) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	n, err := w.ResponseWriter.Write(b)
	w.bytes += int64(n)
	return n, err
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// front refuses what no route should answer. Without --api-key it refuses names other than this
// machine's, so a web page cannot reach the proxy through DNS rebinding. Unmatched paths and
// methods get the API error shape, with the mux's status and Allow header.
func front(key secret, bound string, mux *http.ServeMux) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		host, _, err := net.SplitHostPort(r.Host)
		if err != nil {
			host = r.Host
		}
		scheme, got, _ := strings.Cut(r.Header.Get("Authorization"), " ")
		if !strings.EqualFold(scheme, "Bearer") { // schemes are case-insensitive (RFC 9110, 11.1)
			got = r.Header.Get("X-Api-Key")
		}
		h, pattern := mux.Handler(r)
		switch {
		case key == "" && !isLoopback(host) && !strings.EqualFold(strings.TrimSuffix(host, "."), bound):
			return &apiError{kind: errForbidden, code: "host_not_allowed", msg: fmt.Sprintf("Host %q is "+
				"not allowed: ccproxy answers only requests addressed to localhost (DNS-rebinding "+
				"protection); set --api-key to accept other names", r.Host)}
		case key != "" && subtle.ConstantTimeCompare([]byte(got), []byte(key)) != 1:
			return &apiError{kind: errUnauthorized, code: "invalid_api_key", msg: "missing or wrong " +
				"API key: send Authorization: Bearer <key> (or x-api-key) with the key given to --api-key"}
		case pattern != "":
			mux.ServeHTTP(w, r)
			return nil
		}
		rec := muxDecision{}
		h.ServeHTTP(rec, r)
		if allow := http.Header(rec).Get("Allow"); allow != "" {
			w.Header().Set("Allow", allow)
			return &apiError{kind: errMethod, code: "method_not_allowed",
				msg: fmt.Sprintf("%s is not allowed on %s (allowed: %s)", r.Method, r.URL.Path, allow)}
		}
		return &apiError{kind: errNotFound, code: "not_found", msg: fmt.Sprintf("no route for %s %s: "+
			"see GET /codex/v1/models, POST /codex/v1/chat/completions, /codex/v1/responses, "+
			"/codex/v1/messages", r.Method, r.URL.Path)}
	})
}

// muxDecision records the headers of the mux's own 404 or 405 answer: a 405 has Allow.
type muxDecision http.Header

func (d muxDecision) Header() http.Header         { return http.Header(d) }
func (d muxDecision) Write(b []byte) (int, error) { return len(b), nil }
func (d muxDecision) WriteHeader(int)             {}

// writeJSON sends v (or raw JSON bytes) with status 200.
func writeJSON(w http.ResponseWriter, v any) error {
	b, ok := v.([]byte)
	if !ok {
		b = marshal(v)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(b)
	return nil
}

// handleTurn answers Chat Completions, Responses and Anthropic Messages requests.
func handleTurn(sessions *sessionStore, up *upstream, p *prompts, b *bodies, cfg config) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		c, release, err := readCall(w, r, b, cfg.claude)
		defer release()
		if err != nil {
			return err
		}
		m := p.models.find(r.Context(), c.model)
		if err := check(c, m); err != nil {
			return err
		}
		if c.input, err = sessions.expand(c.input); err != nil {
			return err
		}
		sess, sid, keep, err := openSession(r, sessions, c)
		if err != nil {
			return err
		}
		defer func() { sess.release() }()
		input, err := sess.input(c.input)
		if err != nil {
			return err
		}
		if !keep { // previous_response_id with store:false: read, not written
			sess.release()
			sess = nil
		}
		w.Header().Set("X-Session-Id", sid)
		if len(c.ignored) > 0 {
			w.Header().Set("X-Ccproxy-Ignored-Params", strings.Join(c.ignored, ", "))
		}
		out := newRenderer(w, r, c, cfg.reasoning, cfg.keepalive)
		var t turn
		var object []byte // the Responses object, kept and sent
		if err = exchange(r.Context(), up, p, c, input, m, sid, &t, out, w.Header()); err == nil {
			if c.api == apiResponses {
				object = responseObject(&t, c)
			}
			err = sess.commit(input, t.items, t.id, object, len(c.input))
		}
		if err != nil {
			out.fail(err)
		} else {
			out.end(&t, object)
		}
		return nil
	})
}

// exchange sends the call's request and reads the backend's stream into t. Overload that the
// backend reports inside the stream before any output is retried like a 5xx, with the same
// bounded backoff: none of it has reached the client (openai/codex#43337).
func exchange(ctx context.Context, up *upstream, p *prompts, c *call, input []json.RawMessage,
	m *catalogModel, sid string, t *turn, out renderer, h http.Header) error {
	for attempt := 0; ; attempt++ {
		resp, err := p.send(ctx, up, c, input, m, sid)
		if err != nil {
			return err
		}
		maps.Copy(h, codexHeaders(resp.Header))
		err = readTurn(resp.Body, t, out)
		resp.Body.Close()
		var ae *apiError
		if t.began || attempt >= up.retries || !errors.As(err, &ae) || ae.kind != errUnavailable &&
			ae.code != "rate_limit_exceeded" {
			return err
		}
		if err := sleepCtx(ctx, up.backoff<<attempt); err != nil {
			return err
		}
		*t = turn{}
	}
}

// readCall reads a body into a call, as the path's API (a body with "messages" is a chat request
// on the Responses paths too). Invalid UTF-8, which can only be inside strings, becomes U+FFFD,
// as encoding/json decodes it: no raw bytes go upstream or to disk.
func readCall(w http.ResponseWriter, r *http.Request, b *bodies, claude claudeModels) (*call, func(), error) {
	body, release, err := b.read(w, r)
	if err != nil {
		return nil, release, err
	}
	if !utf8.Valid(body) {
		body = bytes.ToValidUTF8(body, []byte("\uFFFD"))
	}
	if len(body) > 1<<20 { // large bodies are parsed one at a time: the other core serves the rest
		b.heavy.Lock()
		defer b.heavy.Unlock()
	}
	ri := info(r)
	ri.logger.Debug("request body", "body", redacted(body))
	var c *call
	switch {
	case strings.HasSuffix(r.URL.Path, "/chat/completions"):
		c, err = parseChat(body)
	case strings.Contains(r.URL.Path, "/messages"):
		c, err = parseMessages(body, claude)
	default:
		c, err = parseResponses(body)
	}
	if err != nil {
		return nil, release, err
	}
	ri.model, ri.stream, c.lite = c.model, c.stream, r.Header.Get(liteHeader) == "true"
	// The Codex CLI's turn headers pass through: the backend may route a turn by
	// x-codex-turn-state (codex-rs/codex-api/src/requests/headers.rs).
	c.header = http.Header{}
	for k, v := range r.Header {
		if strings.HasPrefix(k, "X-Codex-") || k == "Thread-Id" || k == "X-Client-Request-Id" {
			c.header[k] = v
		}
	}
	return c, release, nil
}

// openSession finds the request's session, locked for this turn, and whether to keep the turn.
// A session named by the path or a header keeps every turn, whatever store says. Otherwise a
// Responses request is kept, in the session of its previous_response_id or a new automatic one,
// unless store is false; Chat and Anthropic clients resend their history, so are not stored.
func openSession(r *http.Request, sessions *sessionStore, c *call) (*session, string, bool, error) {
	// The Codex CLI sends "session-id" (2026) or "session_id" (2025).
	id := cmp.Or(r.PathValue("session_id"), r.Header.Get("Session-Id"), r.Header.Get("Session_id"),
		r.Header.Get("X-Session-Id"))
	keep := id != "" || c.store == nil || *c.store
	switch {
	case c.previousID != "":
		sess, err := sessions.acquireResponse(r.Context(), c.previousID)
		if err != nil {
			return nil, "", false, err
		}
		return sess, sess.id(), keep, nil
	case id == "" && c.api != apiResponses:
		return nil, conversationID(c, r), false, nil
	case !keep:
		return nil, newUUID(), false, nil
	}
	id = cmp.Or(id, autoPrefix+newUUID())
	sess, err := sessions.acquire(r.Context(), id)
	return sess, id, true, err
}

// conversationID names a conversation that has no session: a hash of its opening (the system
// prompt and the first user message) and of the client's key, so a client that resends its
// history hits the backend's prompt cache on every turn, and two clients never share one.
func conversationID(c *call, r *http.Request) string {
	h := sha256.New()
	io.WriteString(h, r.Header.Get("Authorization")+"\x00"+r.Header.Get("X-Api-Key"))
	for _, it := range c.input {
		if h.Write(it[:min(len(it), 64<<10)]); bytes.Contains(it, []byte(`"role":"user"`)) {
			break
		}
	}
	return uuid(h.Sum(nil))
}

// newUUID returns a random UUID, the id the Codex CLI uses for sessions.
func newUUID() string {
	var b [16]byte
	rand.Read(b[:])
	return uuid(b[:])
}

// uuid formats the first 16 bytes of b as a version 4 UUID, setting the version and variant bits.
func uuid(b []byte) string {
	b[6], b[8] = b[6]&0x0f|0x40, b[8]&0x3f|0x80
	h := hex.EncodeToString(b[:16])
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// bodies bounds the bytes of request bodies held at once (--max-inflight-bytes), from their first
// byte until their handler returns, so many large uploads cannot exhaust memory.
type bodies struct {
	mu        sync.Mutex
	held, max int64
	heavy     sync.Mutex    // held while a large body is parsed
	idle      time.Duration // how long a body may stall
}

func (b *bodies) take(n int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.held+n > b.max {
		return false
	}
	b.held += n
	return true
}

var errBodiesFull = &apiError{kind: errUnavailable, code: "server_busy",
	header: http.Header{"Retry-After": {"5"}}, msg: "ccproxy is holding as many request bodies as " +
		"--max-inflight-bytes allows; retry in a few seconds"}

// read reads the request body, up to maxBodyBytes, within the bound. A body that stops arriving
// for b.idle is cut off with a 408; one the client breaks (a malformed chunk, a cut) is a 400.
// Its bytes count against the bound until release.
func (b *bodies) read(w http.ResponseWriter, r *http.Request) (body []byte, release func(), err error) {
	var held int64
	release = func() { b.take(-held) }
	rc := http.NewResponseController(w)
	defer rc.SetReadDeadline(time.Time{}) // the connection's idle reads are the server's again
	capped := http.MaxBytesReader(w, r.Body, maxBodyBytes)
	src := readerFunc(func(p []byte) (int, error) { // a body may take as long as it needs while it arrives
		rc.SetReadDeadline(time.Now().Add(b.idle))
		return capped.Read(p)
	})
	switch n := r.ContentLength; {
	case n > maxBodyBytes:
		return nil, release, &http.MaxBytesError{Limit: maxBodyBytes}
	case n >= 0: // into a buffer of the right size
		if !b.take(n) {
			return nil, release, errBodiesFull
		}
		held, body = n, make([]byte, n)
		_, err = io.ReadFull(src, body)
	default: // chunked: counted as it arrives
		var buf bytes.Buffer
		for ; err == nil; held += 16 << 10 {
			if !b.take(16 << 10) {
				return nil, release, errBodiesFull
			}
			_, err = io.CopyN(&buf, src, 16<<10)
		}
		if body = buf.Bytes(); errors.Is(err, io.EOF) {
			err = nil
		}
	}
	info(r).bodyRead = err == nil
	var tooBig *http.MaxBytesError
	switch {
	case err == nil, errors.As(err, &tooBig):
	case errors.Is(err, os.ErrDeadlineExceeded):
		err = &apiError{kind: errTimeout, code: "body_timeout", cause: err,
			msg: fmt.Sprintf("the request body stopped arriving for %s; send it whole", b.idle)}
	default:
		err = &apiError{kind: errInvalid, code: "bad_body", cause: err,
			msg: "could not read the request body: " + err.Error()}
	}
	return body, release, err
}

type readerFunc func(p []byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// redactPattern finds JSON string values of secret-looking keys, and of images.
var redactPattern = regexp.MustCompile(`(?i)("[^"]*(?:token|secret|password|api_?key|authorization|` +
	`result|b64_json|image)[^"]*"\s*:\s*)"(?:[^"\\]|\\.)*"`)

// redacted logs a body's first 16 KiB with secret-looking values hidden, computed only if the
// record is written.
type redacted []byte

func (b redacted) LogValue() slog.Value {
	return slog.StringValue(redactPattern.ReplaceAllString(string(b[:min(len(b), 16<<10)]), `$1"REDACTED"`))
}

// renderer writes one client API's answer while the turn grows.
type renderer interface {
	piece(p *piece)             // a piece of the reply
	event(ev *event)            // every backend event, after the turn took it in
	flush()                     // no more upstream bytes are waiting
	end(t *turn, object []byte) // the turn is complete and saved; object: the Responses object
	fail(err error)             // the turn failed, or could not be saved
}

// answer is the renderer: one JSON object, or a stream of chat chunks, of Anthropic events, or of
// the backend's own events. A stream's closing events wait until the turn is saved, so a failed
// save still ends it with an error, never a clean end. The zero answer renders nothing.
type answer struct {
	w           http.ResponseWriter
	r           *http.Request
	api         int
	sw          *sseWriter          // nil: no stream
	pieces      func(*piece)        // the reply as it grows; nil: relay the backend's events
	finish      func(*turn, []byte) // the JSON object, or the closing events
	held        event               // the backend's terminal event, for a native client
	relayedFail bool                // the native client already has the backend's failure event
}

func newRenderer(w http.ResponseWriter, r *http.Request, c *call, mode reasoningMode,
	keepalive time.Duration) renderer {
	id, created := info(r).id, time.Now().Unix()
	o := &answer{w: w, r: r, api: c.api}
	if !c.stream {
		o.finish = func(t *turn, b []byte) {
			switch c.api {
			case apiChat:
				b = chatCompletion(t, "chatcmpl-"+id, created, c.model, mode, c.jsonMode)
			case apiMessages:
				b = anthropicMessage(t, "msg_"+id, c.clientModel)
			}
			info(r).logger.Debug("response body", "body", redacted(b))
			writeJSON(w, b)
		}
		return o
	}
	o.sw = newSSEWriter(w, keepalive)
	switch c.api {
	case apiChat:
		emit := func(b []byte) { o.sw.event("", b) }
		cs := newChatStream("chatcmpl-"+id, created, c.model, mode, c.jsonMode, emit)
		o.pieces, o.finish = cs.piece, func(t *turn, _ []byte) {
			cs.finish(t, c.includeUsage)
			o.sw.event("", []byte("[DONE]"))
		}
	case apiMessages: // Anthropic clients expect ping events during silence
		as := &anthropicStream{id: "msg_" + id, model: c.clientModel, emit: o.sw.event}
		o.pieces, o.finish = as.piece, func(t *turn, _ []byte) { as.finish(t) }
		o.sw.ping = []byte("event: ping\ndata: {\"type\":\"ping\"}\n\n")
	default: // the terminal event, with the object the client would get without a stream
		o.finish = func(_ *turn, obj []byte) {
			var ev object
			json.Unmarshal(o.held.data, &ev)
			ev["response"] = obj
			o.sw.event(o.held.typ, marshal(ev))
		}
	}
	return o
}

func (o *answer) piece(p *piece) {
	if o.pieces != nil {
		o.pieces(p)
	}
}

func (o *answer) event(ev *event) {
	switch {
	case o.sw == nil || o.pieces != nil:
	case ev.typ == "response.completed" || ev.typ == "response.done" || ev.typ == "response.incomplete":
		o.held = event{typ: ev.typ, data: bytes.Clone(ev.data)}
	default:
		o.relayedFail = o.relayedFail || ev.typ == "response.failed" || ev.typ == "error"
		o.sw.event(ev.typ, ev.data)
	}
}

func (o *answer) flush() {
	if o.sw != nil {
		o.sw.flush()
	}
}

func (o *answer) end(t *turn, obj []byte) {
	o.finish(t, obj)
	if o.sw != nil {
		o.sw.flush()
		o.sw.close()
	}
}

// fail ends a stream with an error event, which the SDKs raise. Before a stream began, or
// without one, the error is an ordinary HTTP error.
func (o *answer) fail(err error) {
	if o.sw == nil || !o.sw.close() {
		writeError(o.w, o.r, err)
		return
	}
	if clientGone(o.r, err) || o.relayedFail { // the Codex CLI maps response.failed itself
		return
	}
	info(o.r).err = err.Error()
	o.sw.event(errorEvent(o.api, err))
	o.sw.flush()
}

// prompts applies --instructions to each request.
type prompts struct {
	instructions instructions
	models       *catalog
	needs        sync.Map // auto mode: what the backend insisted on ("empty" or "catalog"), by model
}

// prompt says how the call's request carries instructions. In every mode but none the client's
// own instructions travel as a leading developer message, as the Codex CLI sends its prompt;
// none sends exactly what the client sent.
func (p *prompts) prompt(ctx context.Context, c *call) (prompt, error) {
	mode := p.instructions.mode
	if need, ok := p.needs.Load(c.model); ok {
		mode = need.(string)
	}
	switch mode {
	case "none":
		return prompt{key: c.instructions}, nil
	case "file":
		return prompt{&p.instructions.text, true}, nil
	case "catalog":
		text, err := p.models.instructions(ctx, c.model)
		return prompt{&text, true}, err
	case "empty":
		return prompt{new(string), true}, nil
	}
	return prompt{asMessage: true}, nil
}

// send posts the call's request. The Codex CLI sends no instructions, and by default neither
// does ccproxy. Should the backend answer that instructions are required (reported for some
// clients in 2026), the request goes once more with "instructions": ""; only if it says they
// are not valid does it get the model's prompt from the catalog. Either is kept for the model.
func (p *prompts) send(ctx context.Context, up *upstream, c *call, input []json.RawMessage,
	m *catalogModel, sid string) (*http.Response, error) {
	pr, err := p.prompt(ctx, c)
	if err != nil {
		return nil, err
	}
	resp, err := up.send(ctx, buildRequest(c, input, m, pr, sid))
	var ue *upstreamError
	if p.instructions.mode != "auto" || !errors.As(err, &ue) || ue.status != 400 {
		return resp, err
	}
	var need string
	switch msg := strings.ToLower(ue.msg); {
	case pr.key == nil && strings.Contains(msg, "instructions are required"):
		need = "empty"
	case (pr.key == nil || *pr.key == "") && strings.Contains(msg, "instructions are not valid"):
		need = "catalog"
	default:
		return resp, err
	}
	p.needs.Store(c.model, need)
	if pr, err = p.prompt(ctx, c); err != nil {
		return nil, fmt.Errorf("%w (and fetching the model's instructions failed: %w)", ue, err)
	}
	return up.send(ctx, buildRequest(c, input, m, pr, sid))
}

func handleModels(models *catalog) http.Handler {
	type model struct {
		ID      string `json:"id"`
		Object  string `json:"object"`
		Created int64  `json:"created"`
		OwnedBy string `json:"owned_by"`
	}
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		list, err := models.list(r.Context())
		if err != nil {
			info(r).logger.Warn("serving cached or built-in models", "err", err)
		}
		data := []model{}
		for _, m := range list {
			if m.Visibility != "hide" {
				data = append(data, model{ID: m.Slug, Object: "model", OwnedBy: "openai"})
			}
		}
		return writeJSON(w, map[string]any{"object": "list", "data": data})
	})
}

// handleImages answers the OpenAI Images API: n turns with the backend's image_generation tool,
// in parallel, none of them stored. The first failure, or the client leaving, ends all.
func handleImages(up *upstream, p *prompts, b *bodies, model string) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		body, release, err := b.read(w, r)
		defer release()
		if err != nil {
			return err
		}
		c, n, err := parseImages(body, model)
		if err != nil {
			return err
		}
		info(r).model = c.model
		m := p.models.find(r.Context(), c.model)
		if err := check(c, m); err != nil {
			return err
		}
		ctx, cancel := context.WithCancelCause(r.Context())
		defer cancel(nil)
		turns := make([]*turn, n)
		var wg sync.WaitGroup
		for i := range turns {
			turns[i] = &turn{}
			wg.Go(func() {
				err := exchange(ctx, up, p, c, c.input, m, newUUID(), turns[i], &answer{}, http.Header{})
				if err != nil {
					cancel(err)
				}
			})
		}
		wg.Wait()
		images, err := imagesAnswer(turns, time.Now().Unix())
		if err = cmp.Or(context.Cause(ctx), err); err != nil {
			return err
		}
		return writeJSON(w, images)
	})
}

// handleCountTokens answers the Anthropic token count with an estimate: a quarter of the bytes
// of the translated input and tools, about four bytes a token for English text and JSON.
func handleCountTokens(b *bodies, claude claudeModels) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		c, release, err := readCall(w, r, b, claude)
		defer release()
		if err != nil {
			return err
		}
		return writeJSON(w, map[string]int64{"input_tokens": (sizeOf(c.input) + sizeOf(c.tools) + 3) / 4})
	})
}

// handleStored answers GET and DELETE of a stored response, and GET of its input items as an
// OpenAI list. Stored items have no ids of their own, so listed ones are named by their place.
func handleStored(sessions *sessionStore) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		id := r.PathValue("id")
		if r.Method == http.MethodDelete {
			if err := sessions.deleteResponse(id); err != nil {
				return err
			}
			return writeJSON(w, map[string]any{"id": id, "object": "response", "deleted": true})
		}
		e, items, err := sessions.stored(id)
		q := r.URL.Query()
		limit, lerr := strconv.Atoi(cmp.Or(q.Get("limit"), "20"))
		switch {
		case err != nil:
			return err
		case !strings.HasSuffix(r.Pattern, "/input_items"):
			return writeJSON(w, []byte(e.Response))
		case lerr != nil || limit < 1 || limit > 100:
			return invalid("limit", "Invalid value for 'limit': expected an integer from 1 to 100.")
		}
		var list []object
		for i, it := range items[e.Input[0]:e.Input[1]] {
			var o object
			json.Unmarshal(it, &o)
			o["id"] = marshal(fmt.Sprintf("item_%d", i))
			list = append(list, o)
		}
		if q.Get("order") != "asc" { // the OpenAI default is desc
			slices.Reverse(list)
		}
		after := marshal(q.Get("after"))
		if i := slices.IndexFunc(list, func(o object) bool { return bytes.Equal(o["id"], after) }); i >= 0 {
			list = list[i+1:]
		}
		n := min(limit, len(list))
		page := map[string]any{"object": "list", "data": append([]object{}, list[:n]...),
			"has_more": len(list) > n, "first_id": nil, "last_id": nil}
		if n > 0 {
			page["first_id"], page["last_id"] = list[0]["id"], list[n-1]["id"]
		}
		return writeJSON(w, page)
	})
}

// handleSessions lists the live sessions, shows one with its transcript, or drops one.
func handleSessions(sessions *sessionStore) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		id := r.PathValue("id")
		switch {
		case id == "":
			list, err := sessions.list()
			if err != nil {
				return err
			}
			return writeJSON(w, map[string]any{"object": "list", "data": append([]sessionInfo{}, list...)})
		case r.Method == http.MethodDelete:
			if err := sessions.delete(id); err != nil {
				return err
			}
			return writeJSON(w, map[string]any{"id": id, "object": "session", "deleted": true})
		}
		si, items, err := sessions.get(id)
		if err != nil {
			return err
		}
		return writeJSON(w, struct {
			sessionInfo
			Transcript []json.RawMessage `json:"transcript"`
		}{si, items})
	})
}

func handleUsage(up *upstream) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		report, err := up.report(r.Context())
		if err != nil {
			info(r).logger.Warn("usage unavailable", "err", err)
		}
		return writeJSON(w, report)
	})
}
