// Types of elector-client (index.cjs / index.mjs). The wire format is PROTOCOL.md; events
// carry the protocol's fields in camelCase. Fields a newer broker adds are not listed here
// and are ignored by the client.
import { EventEmitter } from 'node:events';

export declare const PROTOCOL_VERSION: 1;
export declare const PROTOCOL_MINOR: 1;
export declare const MAX_LINE_BYTES: number;
export declare const DEFAULT_SOCKET_PATH: string;
export declare const ERROR_CODES: readonly ErrorCode[];

export type LockKind = 'lease' | 'endpoints';
export type LostReason =
  | 'resigned' | 'renew_failed' | 'preempted' | 'broker_shutdown' | 'disconnected' | 'broker_unavailable'
  | (string & {});
export type ErrorCode =
  | 'line_too_long' | 'invalid_utf8' | 'invalid_json' | 'invalid_request' | 'unknown_op'
  | 'invalid_election' | 'invalid_namespace' | 'invalid_identity' | 'invalid_timing'
  | 'already_campaigning' | 'not_campaigning' | 'not_observing' | 'identity_in_use'
  | 'too_many_campaigns' | 'too_many_connections' | 'forbidden_namespace' | 'forbidden_identity'
  | 'unattested' | 'timeout' | 'too_many_errors' | 'slow_consumer' | 'shutting_down' | 'internal'
  | 'api_forbidden' | 'not_a_lock';

export interface ElectionName {
  election: string;
  namespace: string;
  lock: LockKind;
}

/** Who leads now. `leader` is null when nobody holds a live lease, or when the broker cannot
 * tell (then `unknown` says why). `term` only grows: a fencing token. */
export interface LeaderEvent extends ElectionName {
  type: 'leader';
  leader: string | null;
  term: number | null;
  isMe: boolean;
  unknown?: string;
}

/** This campaign now leads, in `term`. `validUntil`: until when it may act without hearing
 * more (CLOCK_MONOTONIC ns, see `monotonicNs()`); null from a 1.0 broker or when this process
 * does not share the broker's clock (then a disconnect ends leadership at once). */
export interface ElectedEvent extends ElectionName {
  type: 'elected';
  identity: string;
  term: number;
  validUntil: number | null;
}

/** This campaign no longer leads. Client-side reasons: `disconnected` (the connection to the
 * broker broke and there was no guarantee to lead on), `broker_unavailable` (no broker
 * confirmed the leadership before its guarantee ran out). */
export interface LostEvent extends ElectionName {
  type: 'lost';
  identity: string;
  term: number;
  reason: LostReason;
}

/** The broker went away while this campaign led (protocol 1.1): it goes on leading until
 * `validUntil` (CLOCK_MONOTONIC ns) at most while the client reconnects and resumes; then
 * `safe`, or `lost` (`broker_unavailable` exactly at `validUntil`, `preempted` if refused). */
export interface JeopardyEvent extends ElectionName {
  type: 'jeopardy';
  identity: string;
  term: number;
  validUntil: number;
}

/** A broker confirmed the leadership after a jeopardy: same term, a fresh `validUntil`. */
export interface SafeEvent extends ElectionName {
  type: 'safe';
  identity: string;
  term: number;
  validUntil: number;
}

/** The broker renewed this leader's lock: a fresh `validUntil` (protocol 1.1). Emitted as the
 * campaign's `renewed` event only, not yielded by its iterator. */
export interface RenewedEvent extends ElectionName {
  type: 'renewed';
  identity: string;
  term: number;
  validUntil: number;
}

export type ElectionEvent = LeaderEvent | ElectedEvent | LostEvent | JeopardyEvent | SafeEvent;

export interface Hello {
  protocol: number;
  brokerVersion: string;
  node: string;
  defaultNamespace: string;
  caller: { namespace: string | null; pod: string | null } | null;
  /** 1 from a protocol 1.1 broker; null from 1.0. */
  protocolMinor: number | null;
  /** The broker's CLOCK_MONOTONIC (ns) when it greeted (protocol 1.1). */
  monotonicNow: number | null;
}

export interface ElectionStatus extends ElectionName {
  identity: string | null;
  leader: string | null;
  term: number | null;
  isMe: boolean;
}

export interface Status {
  campaigns: ElectionStatus[];
  observations: ElectionStatus[];
}

export interface Timing {
  /** Whole seconds. */
  leaseDuration?: number;
  renewDeadline?: number;
  retryPeriod?: number;
}

export interface ClientOptions {
  /** Default: $ELECTOR_SOCKET or /var/run/elector/elector.sock. */
  socket?: string;
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  connectTimeoutMs?: number;
}

export interface CampaignOptions {
  /** The holder identity; may be left out when the broker attests callers (the pod name). */
  identity?: string;
  namespace?: string;
  lock?: LockKind;
  timing?: Timing;
  priority?: number;
}

export interface ObserveOptions {
  namespace?: string;
  lock?: LockKind;
}

declare class Membership<E extends ElectionEvent> extends EventEmitter implements AsyncIterable<E> {
  readonly election: string;
  readonly namespace: string;
  readonly lock: LockKind;
  /** Who leads, as last reported (null: nobody, or not known yet). */
  readonly leader: string | null;
  readonly term: number | null;
  readonly closed: boolean;
  /** The next event; null once closed. Rejects after `timeoutMs`. */
  nextEvent(timeoutMs?: number): Promise<E | null>;
  /** Every event in order, until resigned / closed. */
  [Symbol.asyncIterator](): AsyncIterator<E>;
  on(event: 'event', listener: (event: E) => void): this;
  on(event: 'leader', listener: (event: LeaderEvent) => void): this;
  on(event: 'end', listener: () => void): this;
  on(event: string | symbol, listener: (...args: any[]) => void): this;
}

export declare class Observation extends Membership<LeaderEvent> {
  /** Stops observing; the iteration ends. */
  close(): Promise<void>;
}

export declare class Campaign extends Membership<ElectionEvent> {
  readonly identity: string | null;
  /** True between `elected` and `lost`, a jeopardy included (false at once on a disconnect
   * without a guarantee). */
  readonly isLeader: boolean;
  /** Leading without a broker, until `validUntil` at most (protocol 1.1). */
  readonly jeopardy: boolean;
  /** This leader's guarantee (CLOCK_MONOTONIC ns, compare with `monotonicNs()`); null when not
   * leading, from a 1.0 broker, or when this process does not share the broker's clock. */
  readonly validUntil: number | null;
  /** Resolves with the term once this campaign leads. */
  waitElected(timeoutMs?: number): Promise<number>;
  /** Waits until elected, then runs `work`; `signal` is aborted (reason: a LeadershipLost) the
   * moment leadership ends (not by a jeopardy). Resolves with what `work` resolves with. */
  runWhileLeader<T>(work: (signal: AbortSignal, term: number) => T | Promise<T>): Promise<T>;
  /** Gives up the campaign: a `lost` (resigned) event first if it led, then the iteration ends. */
  resign(): Promise<void>;
  on(event: 'event', listener: (event: ElectionEvent) => void): this;
  on(event: 'leader', listener: (event: LeaderEvent) => void): this;
  on(event: 'elected', listener: (event: ElectedEvent) => void): this;
  on(event: 'lost', listener: (event: LostEvent) => void): this;
  on(event: 'jeopardy', listener: (event: JeopardyEvent) => void): this;
  on(event: 'safe', listener: (event: SafeEvent) => void): this;
  on(event: 'renewed', listener: (event: RenewedEvent) => void): this;
  on(event: 'end', listener: () => void): this;
  on(event: string | symbol, listener: (...args: any[]) => void): this;
}

export declare class Client extends EventEmitter {
  constructor(options?: ClientOptions | string);
  static connect(options?: ClientOptions | string): Promise<Client>;
  readonly socketPath: string;
  /** The greeting of the current connection (null while disconnected). */
  readonly hello: Hello | null;
  readonly connected: boolean;
  connect(): Promise<this>;
  campaign(election: string, options?: CampaignOptions): Promise<Campaign>;
  observe(election: string, options?: ObserveOptions): Promise<Observation>;
  status(): Promise<Status>;
  ping(): Promise<void>;
  /** Closes the connection (the broker resigns its campaigns at once); every iteration ends. */
  close(): void;
  on(event: 'connected', listener: (hello: Hello) => void): this;
  on(event: 'disconnected', listener: () => void): this;
  on(event: 'brokerError', listener: (error: BrokerError) => void): this;
  on(event: string | symbol, listener: (...args: any[]) => void): this;
}

export declare function connect(options?: ClientOptions | string): Promise<Client>;
/** CLOCK_MONOTONIC now in nanoseconds (`process.hrtime.bigint()`, libuv's CLOCK_MONOTONIC on
 * Linux): the clock `validUntil` is stated on. */
export declare function monotonicNs(): bigint;

export declare class ElectorError extends Error {}
export declare class ConnectError extends ElectorError {}
export declare class ConnectionLost extends ElectorError {}
export declare class ClientClosed extends ElectorError {}
export declare class ProtocolError extends ElectorError {}
export declare class BrokerError extends ElectorError {
  constructor(code: string, message: string);
  readonly code: ErrorCode | (string & {});
  readonly brokerMessage: string;
}
export declare class LeadershipLost extends ElectorError {
  readonly event: LostEvent | null;
  /** performance.now() when leadership ended. */
  readonly lostAt: number;
}
export declare function brokerError(code: string, message: string): BrokerError;
export declare function errorClassName(code: string): string;

declare class CodeError<C extends ErrorCode> extends BrokerError {
  constructor(message: string);
  readonly code: C;
}
export declare class LineTooLongError extends CodeError<'line_too_long'> {}
export declare class InvalidUtf8Error extends CodeError<'invalid_utf8'> {}
export declare class InvalidJsonError extends CodeError<'invalid_json'> {}
export declare class InvalidRequestError extends CodeError<'invalid_request'> {}
export declare class UnknownOpError extends CodeError<'unknown_op'> {}
export declare class InvalidElectionError extends CodeError<'invalid_election'> {}
export declare class InvalidNamespaceError extends CodeError<'invalid_namespace'> {}
export declare class InvalidIdentityError extends CodeError<'invalid_identity'> {}
export declare class InvalidTimingError extends CodeError<'invalid_timing'> {}
export declare class AlreadyCampaigningError extends CodeError<'already_campaigning'> {}
export declare class NotCampaigningError extends CodeError<'not_campaigning'> {}
export declare class NotObservingError extends CodeError<'not_observing'> {}
export declare class IdentityInUseError extends CodeError<'identity_in_use'> {}
export declare class TooManyCampaignsError extends CodeError<'too_many_campaigns'> {}
export declare class TooManyConnectionsError extends CodeError<'too_many_connections'> {}
export declare class ForbiddenNamespaceError extends CodeError<'forbidden_namespace'> {}
export declare class ForbiddenIdentityError extends CodeError<'forbidden_identity'> {}
export declare class UnattestedError extends CodeError<'unattested'> {}
export declare class BrokerTimeoutError extends CodeError<'timeout'> {}
export declare class TooManyErrorsError extends CodeError<'too_many_errors'> {}
export declare class SlowConsumerError extends CodeError<'slow_consumer'> {}
export declare class ShuttingDownError extends CodeError<'shutting_down'> {}
export declare class InternalError extends CodeError<'internal'> {}
export declare class ApiForbiddenError extends CodeError<'api_forbidden'> {}
export declare class NotALockError extends CodeError<'not_a_lock'> {}
