'use strict';
// A small Node.js client for lstm-stream: the service loaded from its .proto, a session fed
// timesteps and resumed exactly once after a lost connection, and the server's ErrorInfo read
// from an error. Only @grpc/grpc-js, @grpc/proto-loader, protobufjs and google-proto-files.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

// The repository's proto/ folder; set LSTM_STREAM_PROTO_DIR where the example is copied away.
const PROTO_DIR = process.env.LSTM_STREAM_PROTO_DIR || path.join(__dirname, '..', '..', 'proto');
// google/rpc/status.proto and error_details.proto, as Google publishes them.
const GOOGLE_PROTOS = path.dirname(require.resolve('google-proto-files/package.json'));

// keepCase: field names as in the .proto (start_step, not startStep); longs: uint64 fields as
// Numbers; defaults: unset fields present (0, '', []), as other languages' clients see them.
const LOADER_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true };

const RETRYABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED]);
const MAX_RETRIES = 10;

function connect(target, { token } = {}) {
  const definition = protoLoader.loadSync('lstm_stream/v1/inference.proto', {
    ...LOADER_OPTIONS,
    includeDirs: [PROTO_DIR, GOOGLE_PROTOS],  // google/rpc/status.proto (ChunkResult.error)
  });
  const { InferenceService } = grpc.loadPackageDefinition(definition).lstm_stream.v1;
  const client = new InferenceService(target, grpc.credentials.createInsecure());
  const metadata = (sessionId) => {
    const m = new grpc.Metadata();
    if (sessionId) m.set('x-session-id', sessionId); // lets a balancer route by session
    if (token) m.set('authorization', `Bearer ${token}`);
    return m;
  };
  const unary = (method, request, sessionId = '') =>
    new Promise((resolve, reject) => {
      client[method](request, metadata(sessionId), (err, response) =>
        err ? reject(withErrorInfo(err)) : resolve(response),
      );
    });
  return { client, metadata, unary, close: () => client.close() };
}

let rpcTypes;

// The google.rpc.Status in an error's `grpc-status-details-bin` trailer, its ErrorInfo
// decoded: err.reason ('BAD_INPUT', 'STEP_OUT_OF_ORDER', ...) and err.errorMetadata
// ({expected_step: '12'}, ...).
function withErrorInfo(err) {
  const raw = err.metadata && err.metadata.get('grpc-status-details-bin')[0];
  if (!raw) return err;
  if (!rpcTypes) {
    const root = protobuf.loadSync(
      ['status.proto', 'error_details.proto'].map((f) => path.join(GOOGLE_PROTOS, 'google', 'rpc', f)),
    );
    rpcTypes = { Status: root.lookupType('google.rpc.Status'), ErrorInfo: root.lookupType('google.rpc.ErrorInfo') };
  }
  const status = rpcTypes.Status.decode(raw);
  for (const detail of status.details) {
    if (detail.type_url.endsWith('/google.rpc.ErrorInfo') || detail.typeUrl?.endsWith('/google.rpc.ErrorInfo')) {
      const info = rpcTypes.ErrorInfo.toObject(rpcTypes.ErrorInfo.decode(detail.value));
      err.reason = info.reason;
      err.errorMetadata = info.metadata || {};
    }
  }
  return err;
}

// One session. Every chunk carries its start_step, so when a connection is lost the chunk is
// simply sent again on a new stream: the server applies each timestep once and answers a
// repeat from its replay buffer. A new session is created on `model` / `modelVersion` ('' and
// 0: the server's default model, its newest ready version); `info` is that model's.
class Session {
  constructor(connection, info, sessionId = '', nextStep = 0, { model = '', modelVersion = 0 } = {}) {
    this.connection = connection;
    this.model = model;
    this.modelVersion = modelVersion;
    this.inputSize = info.input_size;
    this.outputSize = info.output_size;
    this.sessionId = sessionId;
    this.nextStep = nextStep;
    this.resends = 0; // chunks sent again after a lost connection
    this.call = null;
    this.waiting = null;
  }

  // rows: [[input_size numbers], ...] -> [[output_size numbers], ...], one per timestep.
  // startStep: resend from an earlier step (already applied steps are answered, not applied).
  async send(rows, { reset = false, endSession = false, startStep = this.nextStep } = {}) {
    const request = {
      session_id: this.sessionId,
      start_step: startStep,
      inputs: rows.flat(),
      reset,
      end_session: endSession,
    };
    if (!this.sessionId) {
      delete request.start_step; // a new session: the server numbers from 0
      Object.assign(request, { model: this.model, model_version: this.modelVersion });
    }
    for (let attempt = 0; ; attempt += 1) {
      try {
        const response = await this._exchange(request);
        this.sessionId = response.session_id;
        this.nextStep = Math.max(this.nextStep, response.start_step + response.num_steps);
        if (endSession) this.closeStream();
        return reshape(response.outputs, this.outputSize);
      } catch (err) {
        this.closeStream();
        if (!RETRYABLE.has(err.code) || err.reason || attempt >= MAX_RETRIES || !this.sessionId) {
          throw err;
        }
        this.resends += 1;
        await new Promise((r) => setTimeout(r, Math.min(2000, 50 * 2 ** attempt) * Math.random()));
      }
    }
  }

  // Cut the connection as a network would, right after the next message is written.
  dropAfterNextWrite() {
    this.dropNext = true;
  }

  closeStream() {
    if (this.call) this.call.cancel();
    this.call = null;
  }

  _exchange(request) {
    if (!this.call) this._open();
    return new Promise((resolve, reject) => {
      this.waiting = { resolve, reject };
      this.call.write({ ...request, session_id: this.sessionId });
      if (this.dropNext) {
        this.dropNext = false;
        const call = this.call;
        setImmediate(() => call.cancel()); // written; its answer, if any, is never read
      }
    });
  }

  _open() {
    const call = this.connection.client.StreamSteps(this.connection.metadata(this.sessionId));
    const settle = (fn, value) => {
      if (this.call !== call) return; // a call already given up (cancelled, replaced)
      const waiting = this.waiting;
      this.waiting = null;
      if (waiting) waiting[fn](value);
    };
    call.on('data', (response) => settle('resolve', response));
    call.on('error', (err) => {
      // A cancelled call is a lost connection here: the caller's retry resends the chunk.
      if (err.code === grpc.status.CANCELLED) err.code = grpc.status.UNAVAILABLE;
      settle('reject', withErrorInfo(err));
    });
    call.on('end', () => {
      const err = new Error('stream ended by the server');
      err.code = grpc.status.UNAVAILABLE;
      settle('reject', err);
    });
    this.call = call;
  }
}

function reshape(flat, width) {
  const rows = [];
  for (let i = 0; i < flat.length; i += width) rows.push(Array.from(flat.slice(i, i + width)));
  return rows;
}

module.exports = { connect, Session, withErrorInfo };
