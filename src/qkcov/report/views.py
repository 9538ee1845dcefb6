"""The report's interactive views, in plain HTML/CSS/JS embedded in the page (no library,
nothing fetched): a scatter drawn as SVG with a hover label per point, and the per-prompt
token view (keys coloured by the query's attention before / after the headline swap; hover
or focus a key for its attention and its logit split over the features' query subspaces).

Data travel as JSON in ``<script type="application/json">`` blocks with ``<``, ``>`` and
``&`` escaped (:func:`json_block`), and the script writes every string with
``textContent``, so prompt text such as ``</script>`` or ``<img onerror=...>`` shows as text.
"""

from __future__ import annotations

from typing import Any

from .. import htmlsafe as esc
from ..htmlsafe import json_block

__all__ = ["json_block", "token_view_html", "scatter_html", "verdict_html", "VIEW_CSS", "VIEW_JS"]


def token_view_html(data: dict[str, Any], ident: str) -> str:
    """Container + data of one head's token view (drawn by :data:`VIEW_JS`)."""
    return f'<div class="tokenview" data-src="{esc.attr(ident)}"></div>' + json_block(data, ident)


def scatter_html(spec: dict[str, Any], ident: str) -> str:
    """Container + data of one scatter spec (drawn as SVG by :data:`VIEW_JS`)."""
    return f'<div class="scatter" data-src="{esc.attr(ident)}"></div>' + json_block(spec, ident)


def _num(v: Any) -> str:
    """A verdict's number as a reader wants it: 3 significant digits, lists bracketed."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_num(x) for x in v) + "]"
    return str(v)


def _evidence(ev: Any) -> str:
    """The numbers a verdict rests on, one folded line (``None`` entries left out)."""
    if ev is None or ev == "" or ev == [] or ev == {}:
        return ""
    if isinstance(ev, dict):
        items = [f"{k} = {_num(v)}" for k, v in ev.items() if v is not None]
    elif isinstance(ev, (list, tuple)):
        items = [_num(v) for v in ev]
    else:
        items = [str(ev)]
    return (
        '<details class="evidence"><summary>the numbers it rests on</summary><p>'
        + esc.text(" · ".join(items))
        + "</p></details>"
    )


def verdict_html(verdict: dict[str, Any] | None, lead: str) -> str:
    """The head's verdict line (status, sentence, evidence) or, without one, ``lead``."""
    if isinstance(verdict, dict) and (verdict.get("sentence") or verdict.get("status")):
        status = str(verdict.get("status") or "")
        slug = "".join(c if c.isalnum() else "-" for c in status.lower())
        return (
            f'<p class="verdict st-{esc.text(slug)}"><span class="status">{esc.text(status)}</span> '
            f"{esc.text(str(verdict.get('sentence') or ''))}</p>"
            + _evidence(verdict.get("evidence"))
            + (f'<p class="lead">{esc.text(lead)}</p>' if lead else "")
        )
    return f'<p class="verdict neutral">{esc.text(lead)}</p>'


VIEW_CSS = """
.verdict{font-size:1.05em;padding:.4em .6em;border-left:4px solid #777;background:#f7f7f7}
.verdict .status{font-weight:700;text-transform:uppercase;font-size:.85em;margin-right:.4em}
.st-supported,.st-confirmed,.st-yes{border-color:#1b7837}.st-not-supported,.st-rejected,.st-no{border-color:#b2182b}
.st-reads-feature{border-color:#1b7837}.st-confounded{border-color:#e08214;background:#fff7ec}
.evidence{font-size:.85em;color:#444;margin:.2em 0 .6em}.lead{font-size:.9em;color:#444}
article.head{border-top:1px solid #ddd;margin-top:1.5em;padding-top:.3em}
.figs{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}.figs figure{flex:1 1 440px;max-width:540px}
details{margin:.6em 0}summary{cursor:pointer;font-weight:600}
.tokenview{border:1px solid #ccc;padding:.6em;margin:1em 0;border-radius:4px}
.tv-controls{display:flex;flex-wrap:wrap;gap:.5em;align-items:center;margin-bottom:.5em}
.tv-prompt{line-height:2.1;font-family:ui-monospace,monospace;font-size:.9em;white-space:pre-wrap;word-break:break-all}
.tv-tok{padding:1px 0;border-radius:2px;outline:none}.tv-key{cursor:pointer}
.tv-pos{border-bottom:3px solid #2166ac}.tv-neg{border-bottom:3px solid #d6604d}
.tv-query{outline:2px solid #1b7837}.tv-tok:focus,.tv-tok:hover{box-shadow:0 0 0 2px #000}
.tv-swap::before{content:"⇄";font-size:.7em;color:#000;vertical-align:super}
.tv-detail{min-height:3.2em;font-size:.9em;background:#fafafa;border:1px dashed #bbb;padding:.3em .5em;margin-top:.5em}
.tv-note{font-size:.8em;color:#555}.tv-legend span{margin-right:1em}
.scatter svg{border:1px solid #eee;margin:.2em}.scatter circle:hover{stroke:#000;stroke-width:1.5}
.sc-legend{font-size:15px}.sc-legend>span{margin-right:1em}
"""

VIEW_JS = r"""
(function(){
"use strict";
function el(tag, cls, text){var e=document.createElement(tag);if(cls)e.className=cls;if(text!==undefined)e.textContent=String(text);return e;}
function data(node){return JSON.parse(document.getElementById(node.getAttribute("data-src")).textContent);}
function fmt(x){if(x===null||x===undefined)return "–";var a=Math.abs(x);return (a!==0&&(a<1e-3||a>=1e4))?x.toExponential(2):x.toFixed(a<1?4:3);}
function shown(t){return t.replace(/\n/g,"⏎").replace(/\t/g,"⇥");}
function tokenView(root){
  var d=data(root), mode="before", idx=0;
  var ctl=el("div","tv-controls"), prev=el("button","tv-prev","◀ previous"), next=el("button","tv-next","next ▶");
  var sel=el("select","tv-select"), modeSel=el("select","tv-mode");
  prev.type="button";next.type="button";
  d.prompts.forEach(function(p,i){var o=el("option",null,(p.line!==null&&p.line!==undefined?"JSONL line "+p.line:"record "+p.record)+"  ("+(i+1)+"/"+d.prompts.length+")");o.value=String(i);sel.appendChild(o);});
  var hasAfter=d.prompts.length&&d.prompts[0].after;
  [["before","attention before the swap"],["after","attention after swapping in "+(d.condition||"–")]].forEach(function(m){
    var o=el("option",null,m[1]);o.value=m[0];if(m[0]==="after"&&!hasAfter)o.disabled=true;modeSel.appendChild(o);});
  sel.setAttribute("aria-label","prompt");modeSel.setAttribute("aria-label","colour by");
  ctl.appendChild(prev);ctl.appendChild(sel);ctl.appendChild(next);ctl.appendChild(el("span",null,"colour:"));ctl.appendChild(modeSel);
  root.appendChild(ctl);
  var label=el("div","tv-label");root.appendChild(label);
  var box=el("div","tv-prompt");root.appendChild(box);
  var detail=el("div","tv-detail","Hover or focus (Tab) a key: its attention before/after the swap and its logit split.");
  detail.setAttribute("aria-live","polite");root.appendChild(detail);
  var leg=el("div","tv-legend tv-note");
  [["tv-pos","positive key"],["tv-neg","negative key"],["tv-query","query"],["tv-swap","swapped pair"]].forEach(function(x){var s=el("span",x[0]," "+x[1]+" ");leg.appendChild(s);});
  leg.appendChild(el("span",null,"background: the query's attention (darker = more; scale: this prompt's largest)"));
  root.appendChild(leg);
  var note="Showing "+d.prompts.length+" of "+d.n_eligible+" held-out swap records (at most "+d.cap+" prompts of ≤ "+d.max_tokens+" tokens are saved)."+(hasAfter?"":" No 'after' view: "+(d.after_reason||"no headline swap")+".");
  root.appendChild(el("div","tv-note",note));
  function describe(p,j){
    var role=j===p.query?"query":(p.positives.indexOf(j)>=0?"positive key":(p.negatives.indexOf(j)>=0?"negative key":"other token"));
    if(j===p.orig)role+=", swapped (most-attended positive)";if(j===p.target)role+=", swapped (negative)";
    detail.textContent="";
    detail.appendChild(el("div","tv-d-token","token "+JSON.stringify(p.tokens[j])+" · position "+j+" · "+role));
    detail.appendChild(el("div","tv-d-attn","attention before "+fmt(p.before[j])+(p.after?" → after "+fmt(p.after[j]):"")));
    var s="logit "+fmt(p.logit[j]);
    if(p.parts){s+=" = "+d.part_names.map(function(n,k){return n+" "+fmt(p.parts[k][j]);}).join(" + ");}
    detail.appendChild(el("div","tv-d-logit",s));
  }
  function draw(){
    var p=d.prompts[idx];sel.value=String(idx);
    label.textContent=(p.line!==null&&p.line!==undefined?"JSONL line "+p.line:"record "+p.record+" (built in memory: no JSONL line)")+" · prompt "+(idx+1)+" of "+d.prompts.length;
    box.textContent="";
    var a=(mode==="after"&&p.after)?p.after:p.before, m=1e-12;
    p.before.forEach(function(v){m=Math.max(m,v);});if(p.after)p.after.forEach(function(v){m=Math.max(m,v);});
    p.tokens.forEach(function(t,j){
      var s=el("span","tv-tok",shown(t));s.setAttribute("data-pos",String(j));
      var isKey=p.positives.indexOf(j)>=0||p.negatives.indexOf(j)>=0;
      if(p.positives.indexOf(j)>=0)s.classList.add("tv-pos");
      if(p.negatives.indexOf(j)>=0)s.classList.add("tv-neg");
      if(j===p.query)s.classList.add("tv-query");
      if(j===p.orig||j===p.target)s.classList.add("tv-swap");
      s.classList.add("tv-key");s.tabIndex=isKey||j===p.query?0:-1;
      s.style.backgroundColor="rgba(120,60,160,"+(0.85*a[j]/m).toFixed(3)+")";
      s.title="attention "+fmt(a[j]);
      s.addEventListener("mouseover",function(){describe(p,j);});
      s.addEventListener("focus",function(){describe(p,j);});
      box.appendChild(s);
    });
  }
  prev.addEventListener("click",function(){idx=(idx+d.prompts.length-1)%d.prompts.length;draw();});
  next.addEventListener("click",function(){idx=(idx+1)%d.prompts.length;draw();});
  sel.addEventListener("change",function(){idx=parseInt(sel.value,10);draw();});
  modeSel.addEventListener("change",function(){mode=modeSel.value;draw();});
  draw();
}
var NS="http://www.w3.org/2000/svg";
function svg(tag,attrs){var e=document.createElementNS(NS,tag);for(var k in attrs)e.setAttribute(k,String(attrs[k]));return e;}
function scatter(root){
  var d=data(root), W=300, H=260, pad=30;
  root.appendChild(el("div","sc-title",d.title));
  var sets=Object.keys(d.sets||{"":""});
  sets.forEach(function(set){
    var ser=d.series.filter(function(s){return (s.panel_set||"")===set;});
    if(!ser.length)return;
    var row=el("div","sc-row");row.appendChild(el("div","sc-set",(d.sets||{})[set]||""));
    d.panels.forEach(function(pn){
      var i=pn[0],j=pn[1],xs=[],ys=[];
      ser.forEach(function(s){s.points.forEach(function(p){xs.push(p[i]);ys.push(p[j]);});});
      var x0=Math.min.apply(null,xs),x1=Math.max.apply(null,xs),y0=Math.min.apply(null,ys),y1=Math.max.apply(null,ys);
      if(x1===x0)x1=x0+1;if(y1===y0)y1=y0+1;
      var g=svg("svg",{width:W,height:H,viewBox:"0 0 "+W+" "+H,role:"img"});
      var t1=svg("text",{x:W/2,y:H-4,"text-anchor":"middle","font-size":10});t1.textContent=d.axes[i];g.appendChild(t1);
      var t2=svg("text",{x:10,y:H/2,"font-size":10,transform:"rotate(-90 10 "+H/2+")","text-anchor":"middle"});t2.textContent=d.axes[j];g.appendChild(t2);
      ser.forEach(function(s){s.points.forEach(function(p,k){
        var c=svg("circle",{cx:(pad+(p[i]-x0)/(x1-x0)*(W-1.5*pad)).toFixed(1),cy:(H-pad-(p[j]-y0)/(y1-y0)*(H-1.5*pad)).toFixed(1),r:3,fill:s.hollow?"none":s.color,"fill-opacity":0.7,stroke:s.hollow?s.color:"none","stroke-width":1.3});
        var tt=svg("title",{});tt.textContent=s.labels[k];c.appendChild(tt);g.appendChild(c);});});
      row.appendChild(g);
    });
    root.appendChild(row);
  });
  var leg=el("div","sc-legend");
  d.series.forEach(function(s){var sp=el("span");var dot=el("span",null,s.hollow?"○ ":"● ");dot.style.color=s.color;sp.appendChild(dot);sp.appendChild(document.createTextNode(s.name));leg.appendChild(sp);});
  root.appendChild(leg);
}
function boot(){
  document.querySelectorAll(".tokenview").forEach(function(n){try{tokenView(n);}catch(e){n.textContent="token view failed: "+e;throw e;}});
  document.querySelectorAll(".scatter").forEach(function(n){try{scatter(n);}catch(e){n.textContent="scatter failed: "+e;throw e;}});
}
if(document.readyState==="loading")document.addEventListener("DOMContentLoaded",boot);else boot();
})();
"""
